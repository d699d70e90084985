"""Export a registry version as a self-contained offline / edge bundle (conf/export.yaml).

    python -m jobs.export ref=adult_mlp@production format=onnx   # -> outputs/exports/adult_mlp-v<N>-onnx/
    python -m jobs.export ref=adult_mlp:3 format=torchscript     # -> outputs/exports/adult_mlp-v3-torchscript/
    python -m jobs.export ref=adult_mlp out=/tmp/adult_edge      # bare name: @production; format=onnx
    python -m jobs.export ref=adult_mlp@production storage.uri=s3://bucket/prefix db.url=postgresql://...
    cd outputs/exports/adult_mlp-v<N>-onnx && python example.py  # needs only onnxruntime + numpy

The bundle (model file, signature, model card, preprocessor, example.py + example rows, README,
MANIFEST.json with SHA-256s and lineage) is checked against the served model before it is
written: onnx.checker, and probabilities within 1e-5 of the Predictor the Serve replicas run.
No Ray. Exit codes: 0 ok, 2 bad config, 6 unknown model/version/alias, 7 denied, 12 the bundle
failed its checks (nothing written).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.batch import ExportJob
        from mlops_ray.config.compose import validated
        job = validated(cfg, ExportJob)
        from mlops_ray.export import export
        export(job, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
