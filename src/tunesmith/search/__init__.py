"""Hyperparameter search (Optuna) over the search block of a config."""
