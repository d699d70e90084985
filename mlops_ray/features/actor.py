"""The stream consumer on Ray (`jobs.features action=consume|stop`): a detached actor that Ray
restarts if it dies; the new consumer (the same name) re-reads what the old one had not
acknowledged (features/stream.py says why nothing is lost or applied twice)."""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.errors import ConfigError
from mlops_ray.features.stream import NAMESPACE, StreamConsumer

if TYPE_CHECKING:
    from mlops_ray.config.train import FeaturesJob

log = logging.getLogger(__name__)


def _ray_emit(name: str, value: float, tags: dict[str, str]) -> None:
    from mlops_ray.metrics import CATALOG, metric
    m, kind = metric(name), CATALOG[name].kind
    if kind == "counter":
        m.inc(value, tags=tags)
    elif kind == "gauge":
        m.set(value, tags=tags)
    else:
        m.observe(value, tags=tags)


class ConsumerActor:
    """The consumer in a thread of a detached actor: Ray restarts the actor if it dies, and the
    new consumer (the same name) re-reads what the old one had not acknowledged."""

    def __init__(self, feast: dict[str, Any], storage_uri: str):
        self.stop = threading.Event()
        self.error: str | None = None
        self.restarts = 0
        self.consumer = StreamConsumer(FeastCfg.model_validate(feast), storage_uri,
                                       emit=_ray_emit)
        self.thread = threading.Thread(target=self._loop, name="features-consumer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.consumer.run(self.stop)
            except Exception as e:  # redis down, a bad event: keep trying, say so in status
                self.error = f"{type(e).__name__}: {e}"
                log.exception("feature stream consumer failed; retrying in 1 s")
                try:  # the lag gauge keeps rising while nothing is applied (the alert)
                    self.consumer._emit_lag()
                except Exception as lag_err:  # noqa: BLE001 - Redis itself may be what failed
                    log.debug("lag not measured: %s", lag_err)
                self.stop.wait(1.0)

    def status(self) -> dict[str, Any]:
        lag = None
        try:
            lag = self.consumer.lag_s()
        except Exception as e:  # status answers even when Redis does not
            self.error = f"{type(e).__name__}: {e}"
        bound = self.consumer.cfg.stream.max_lag_s
        return {**self.consumer.status(), "lag_s": lag, "max_lag_s": bound,
                "within_bound": lag is not None and lag <= bound, "pid": os.getpid(),
                "running": self.thread.is_alive(), "error": self.error}

    def shutdown(self) -> bool:
        self.stop.set()
        self.thread.join(timeout=10)
        return not self.thread.is_alive()


def actor_name(cfg: FeastCfg) -> str:
    return f"features-consumer-{cfg.project}"


def consumer_actor(feast: FeastCfg, storage_uri: str) -> Any:
    """The project's consumer actor, started if none runs (Ray must be initialised)."""
    import ray
    remote: Any = ray.remote  # typed for functions; the actor options are Ray's own
    return remote(num_cpus=0.1, max_restarts=-1, max_task_retries=-1)(ConsumerActor).options(
        name=actor_name(feast), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True).remote(feast.plain(), storage_uri)


def _feast(job: FeaturesJob) -> FeastCfg:
    if job.dataset.feast is None:  # FeaturesJob refuses it already
        raise ConfigError(f"dataset '{job.dataset.name}' has no feature store (dataset.feast)")
    return job.dataset.feast


def start_consumer(job: FeaturesJob) -> dict[str, Any]:
    """jobs.features action=consume: the project's consumer actor on this checkout's Ray (or
    `ray.address`), started if none runs; its status."""
    import ray

    from mlops_ray.runtime import ensure_ray
    feast = _feast(job)
    # the actor's working directory is not this one: give it the store's absolute folder
    repo = FeatureRepo(feast, job.storage.uri)
    repo.ensure_applied()  # here, where relative source paths mean what the user meant
    feast = feast.model_copy(update={"path": str(repo.root)})
    ensure_ray(job.ray.plain())
    actor = consumer_actor(feast, job.storage.uri)
    return {"actor": actor_name(feast), "namespace": NAMESPACE,
            **ray.get(actor.status.remote(), timeout=120)}


def stop_consumer(job: FeaturesJob) -> dict[str, Any]:
    """jobs.features action=stop: stop the loop (the batch in flight finishes), then the actor."""
    import ray

    from mlops_ray.runtime import ensure_ray
    feast = _feast(job)
    ensure_ray(job.ray.plain())
    name = actor_name(feast)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return {"actor": name, "stopped": False, "reason": "not running"}
    last: dict[str, Any] = {}
    try:
        ray.get(actor.shutdown.remote(), timeout=30)
        last = ray.get(actor.status.remote(), timeout=30)
    except ray.exceptions.RayError as e:
        last = {"error": str(e)}
    ray.kill(actor, no_restart=True)
    return {"actor": name, "stopped": True, "last_status": last}
