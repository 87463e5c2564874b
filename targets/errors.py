"""Errors a user can act on. Their message is the whole story: callers print it, not a traceback."""


class GreenMLOpsError(Exception):
    """Base class: ``str(error)`` is a complete, user-facing message."""


class ModelDirError(GreenMLOpsError):
    """A model directory is missing, incomplete or describes itself wrongly."""


class InputError(GreenMLOpsError):
    """A request's input does not match the model's signature (shape, dtype, finite values)."""


class ConfigError(GreenMLOpsError):
    """A controller configuration (TOML file or flag) is malformed or out of range."""


class BackendError(GreenMLOpsError):
    """An inference backend failed or could not be reached."""


class RecordsError(GreenMLOpsError):
    """Recorded results (requests.jsonl, run.json) are malformed: not what a run writes."""
