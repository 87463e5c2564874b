"""``green-mlops ladder build``: a user's own checkpoint and labelled data, turned into an early-exit
model directory in the toolkit's contract (:mod:`targets.model.model_dir`), ready for ``validate``,
``serve``, the locustfiles and ``triton repo``. Text: :mod:`green_mlops.ladder.text`; what every
build shares (reading data, splitting, checking, writing the directory): :mod:`green_mlops.ladder.common`.

torch and transformers are needed here only (the ``models`` extra); nothing at run time imports them.
"""
