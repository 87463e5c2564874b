"""The control method: the tau(t) controller, its configuration, the calibration and the certified
budget policy (path, SLO loop, live audit), the controlled target that runs a ladder under it.
Imports no web framework: the gateway and the Triton model both run it."""
