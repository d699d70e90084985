"""Batch scoring (`jobs.predict`): a registry version scores a Parquet/CSV dataset with Ray Data,
streaming, into Parquet predictions and a drift report. `inputs`, `scorer`, `drift` and `output`
are Ray-free; `job` builds the Ray Data pipeline."""
