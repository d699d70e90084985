"""Serving on Ray Serve. `predictor`, `schema`, `cache` and `drift` are Ray-free (used by batch
scoring and tests too); `app` holds the Serve deployments and `control` deploys, rolls out and
rolls back versions by registry alias."""
