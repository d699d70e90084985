"""Ray Train: the per-worker loop (`loop`), the checkpoint layout (`checkpoint`, Ray-free) and
the driver that builds the TorchTrainer and writes the run record (`trainer`)."""
