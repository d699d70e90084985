"""Metrics, cross-validation, fairness and gates. No Ray except the fan-out of folds."""
