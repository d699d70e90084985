"""Judging a model, Ray-free: metrics, statistics (bootstrap, DeLong), the decision threshold,
which rows make each CV fold, fairness (Fairlearn) and mitigation, gates as data, the model
card. Training the folds is train/folds.py's; the orchestration is pipeline/evaluate.py's."""
