"""The experiment's feature store (Feast; dataset.feast in the experiment's dataset config).

    python -m jobs.features +experiment=adult_people_mlp action=apply        # register the views
    python -m jobs.features +experiment=adult_people_mlp action=materialize  # online store <- offline, up to now
    python -m jobs.features +experiment=adult_people_mlp action=materialize end=2024-06-30T00:00:00Z
    python -m jobs.features +experiment=adult_people_mlp action=list         # views, features, freshness
    python -m jobs.features +experiment=adult_people_mlp action=consume      # stream -> stores (a Ray actor)
    python -m jobs.features +experiment=adult_people_mlp action=stop         # stop the consumer

Training needs no step here: `dataset=adult_people` applies the store on first use and joins the
views point in time. Serving reads the online store: materialize (or consume) first.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="features")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.train import FeaturesJob
        from mlops_ray.features.ops import run
        run(validated(cfg, FeaturesJob))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
