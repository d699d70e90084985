"""Where a training loop runs, passed to it explicitly: inside Ray Train workers
(`TrainSession`), as a Ray Tune function trial (`TuneSession`), or as a plain call with no Ray
session (`LocalSession`: a CV fold in a Ray task, a test, a notebook).

A session gives the loop its rank and world size, its device, its data, the checkpoint to
resume from, and takes its reports; it also answers "is a drain announced?" (a barrier under
Ray Train) and publishes the dashboard gauges.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# the gauges rank 0 publishes (ray_mlops_train_<name>) are in mlops_ray/metrics.py's catalog


def quiet_report_lines() -> None:
    """Ray Train 2.60 logs `Reporting training result N: TrainingReport(...)` at INFO for every
    report, on a logger named after its file (outside `ray.train`, so RunConfig's
    LoggingConfig misses it): hold it to the run's Train log level (`ray.train_log_level`,
    WARNING by default); our own one line per epoch is the progress."""
    import contextlib
    import logging

    from ray.train.v2._internal.execution import context as train_context
    level = "WARNING"
    # Ray-internal API: if it moves, the documented default (WARNING) stands
    with contextlib.suppress(Exception):
        config = train_context.get_train_context().train_run_context.get_run_config()
        level = config.logging_config.log_level if config.logging_config else level
    logging.getLogger(train_context.__file__).setLevel(level)


class TrainSession:
    """Ray Train worker API (inside a TorchTrainer)."""
    kind = "train"
    info: Any = None  # the PreemptionInfo of a drain, once seen

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch
        self.train, self.rt = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        quiet_report_lines()

    def data(self, config: dict[str, Any]) -> Any:
        import ray
        return ray.get(config["data_ref"])

    def device(self, use_gpu: bool) -> torch.device:
        return self.rt.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return self.rt.prepare_model(net) if self.world > 1 or device.type == "cuda" else net

    def get_checkpoint(self) -> Any:
        return self.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        ckpt = self.train.Checkpoint.from_directory(directory) if directory else None
        self.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def preempted(self) -> bool:  # a barrier: every rank calls it at the same points
        self.info = self.train.get_preemption_info()
        return self.info is not None

    def hold(self, grace_s: float) -> None:
        """After a just-in-time checkpoint: wait for Ray Train to tear this group down at the
        drain deadline instead of training steps that the restart would redo. Ray Train
        restarts at the deadline (+ grace) even when the node stays; should that restart not
        come within 2 minutes (a controller that is gone), training goes on."""
        until = self.info.deadline_ms / 1000 + grace_s + 120 if self.info else time.time()
        while time.time() < until:
            time.sleep(0.2)

    def publish(self, values: dict[str, float], run: str) -> None:
        """Gauges on the Ray dashboard / Prometheus (rank 0 only): `ray_mlops_train_*`."""
        if self.rank != 0:
            return
        from mlops_ray.metrics import metric
        for name, v in values.items():
            metric(f"mlops_train_{name}").set(float(v), tags={"run": run})


class TuneSession(TrainSession):
    """The same loop run directly as a Tune function trial (1 worker, no Train start-up)."""
    kind = "tune"

    def __init__(self) -> None:
        import ray.tune
        self.tune, self.rank, self.world = ray.tune, 0, 1

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return net.to(device)

    def get_checkpoint(self) -> Any:
        return self.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        ckpt = self.tune.Checkpoint.from_directory(directory) if directory else None
        self.tune.report(metrics, checkpoint=ckpt)

    def preempted(self) -> bool:
        return False  # a drained node kills the trial actor; Tune retries it from its checkpoint

    def publish(self, values: dict[str, float], run: str) -> None:
        pass


class _DirCheckpoint:
    """A local checkpoint folder with Ray's Checkpoint.as_directory interface."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class LocalSession(TuneSession):
    """No Ray session: a plain call. The data comes with it; the last checkpoint is copied to
    `local_dir`, and with `resume=True` a rerun resumes from it, as a rerun of a Ray Train run
    resumes from its latest checkpoint."""
    kind = "local"

    def __init__(self, local_dir: str | None, data: Any = None, resume: bool = False) -> None:
        self.rank, self.world = 0, 1
        self.local_dir, self._data, self.resume = local_dir, data, resume

    def data(self, config: dict[str, Any]) -> Any:
        return self._data

    def get_checkpoint(self) -> Any:
        if self.resume and self.local_dir and (Path(self.local_dir) / "state.pt").exists():
            return _DirCheckpoint(self.local_dir)
        return None

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        if directory and self.local_dir:
            shutil.copytree(directory, self.local_dir, dirs_exist_ok=True)
