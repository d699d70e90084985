"""Artifact layouts shared by training, evaluation, the registry and serving (no Ray, no
Hydra): the checkpoint folder (`checkpoint`)."""
