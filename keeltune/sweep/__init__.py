"""Hyperparameter sweeps on the login node (no torch): ``trials`` (a trial's run folder, config and metrics),
``study`` (Optuna's storage, samplers, pruners), ``driver`` (``keeltune sweep``: submit, reattach, retry,
prune), ``report`` (status table, Pareto front, importances, the front's configs)."""
