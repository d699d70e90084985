"""Ray Tune + Optuna: search spaces as data, ASHA on the reported epoch, studies in a database."""
