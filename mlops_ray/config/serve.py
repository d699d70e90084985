"""jobs.serve: the Serve application (Ray Serve's own names: num_replicas, autoscaling_config,
max_ongoing_requests, ray_actor_options, max_batch_size, batch_wait_timeout_s), rollouts, drift,
feedback, auth and limits; `ServeJob` = which registry version, which action (conf/serve.yaml)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mlops_ray.config.base import RayCfg, RegistrySections, Strict, registry_ref


class ServeDeploymentCfg(Strict):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    ray_actor_options: dict[str, Any] = {"num_cpus": 0.25}
    autoscaling_config: dict[str, Any] | None = None
    chaos_error_rate: float = Field(0.0, ge=0, le=1)


class BatchingCfg(Strict):
    max_batch_size: int = Field(64, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)


class LimitsCfg(Strict):
    max_rows: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1048576, ge=1024)
    unknown_categories: Literal["allow", "reject"] = "allow"


class CacheCfg(Strict):
    enabled: bool = True
    max_entries: int = Field(10000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # answers kept, in bytes
    ttl_s: float = Field(300, gt=0)


class AuthCfg(Strict):
    """Keys per scope: predictions (api), /admin/* and /feedback each have their own. Keys
    listed here end up in the Serve config; prefer the variables (a Kubernetes Secret)."""
    api_keys: list[str] = []
    api_keys_env: str | None = "MLOPS_RAY_SERVE_API_KEYS"
    key_file: str | None = None
    admin_keys_env: str | None = "MLOPS_RAY_SERVE_ADMIN_KEYS"
    feedback_keys_env: str | None = "MLOPS_RAY_SERVE_FEEDBACK_KEYS"
    # serve.host off loopback without any key is refused unless this says so, explicitly
    allow_anonymous: bool = False


class DriftCfg(Strict):
    window: int = Field(1000, ge=10)
    min_rows: int = Field(200, ge=10)
    check_interval_s: float = Field(5, gt=0)
    psi_threshold: float = Field(0.2, gt=0)
    js_threshold: float = Field(0.15, gt=0, le=1)
    p_value: float = Field(0.01, gt=0, lt=1)
    webhook_url: str | None = Field(None, pattern=r"^https?://")


class FeedbackCfg(Strict):
    window: int = Field(5000, ge=10)
    max_pending: int = Field(10000, ge=10)  # answered requests kept for their labels...
    max_pending_rows: int = Field(200000, ge=10)  # ...and their rows, at most
    rate_per_s: float = Field(20, gt=0)  # feedback requests per second per key (429 above)
    burst: int = Field(40, ge=1)


class PredictionLogCfg(Strict):
    """Every answered record appended to Parquet on the configured storage, off the request
    path (serving/predlog.py). A crashed replica loses what it had not flushed: at most
    flush_interval_s of its answers, or flush_rows rows, whichever comes first."""
    enabled: bool = True
    uri: str | None = None  # null: <storage.uri>/prediction_log; else a path or s3:// URI
    sample_rate: float = Field(1.0, ge=0, le=1)  # share of answered requests logged
    flush_interval_s: float = Field(2.0, gt=0, le=3600)
    flush_rows: int = Field(5000, ge=1)  # a buffer this full is written at once
    max_buffer_rows: int = Field(100000, ge=1)  # rows waiting (writes failing): more are dropped
    # sensitive attributes (the signature's role=sensitive inputs) are left out unless true:
    # live fairness and retraining from the log need them (docs/monitoring.md: who can read it)
    log_sensitive: bool = False
    exclude: list[str] = []  # more input fields never logged

    @model_validator(mode="after")
    def _bounds(self) -> PredictionLogCfg:
        if self.max_buffer_rows < self.flush_rows:
            raise ValueError(f"serve.prediction_log.max_buffer_rows={self.max_buffer_rows} is "
                             f"below flush_rows={self.flush_rows}")
        return self


class LiveCfg(Strict):
    # how often each ingress replica pushes its statistics, drift rows and answers to the app's
    # hub (serving/hub.py), which rollouts, action=status and /admin/* read
    push_interval_s: float = Field(0.25, gt=0, le=60)


class RolloutCfg(Strict):
    strategy: Literal["canary", "bluegreen", "ab", "shadow"] = "canary"
    steps: list[int] = [10, 50, 100]
    bake_s: float = Field(30, ge=0)
    poll_s: float = Field(0.5, gt=0)
    min_requests: int = Field(20, ge=1)  # a step also waits for these, up to max_bake_s
    max_bake_s: float = Field(600, gt=0)
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p99_ms: float = Field(250, gt=0)
    max_prediction_shift: float = Field(0.1, ge=0, le=1)
    ab_weights: list[float] = [50, 50]
    ab_key: str | None = None

    @model_validator(mode="after")
    def _steps(self) -> RolloutCfg:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) \
                or self.steps != sorted(self.steps):
            raise ValueError(f"serve.rollout.steps={self.steps}: increasing percentages in "
                             "(0, 100]")
        if self.max_bake_s < self.bake_s:
            raise ValueError(f"serve.rollout.max_bake_s={self.max_bake_s} is below "
                             f"bake_s={self.bake_s}")
        if len(self.ab_weights) != 2 or min(self.ab_weights) < 0 or sum(self.ab_weights) <= 0:
            raise ValueError(f"serve.rollout.ab_weights={self.ab_weights}: two weights >= 0")
        return self


class GrpcCfg(Strict):
    enabled: bool = False
    port: int = Field(9000, ge=1, le=65535)
    servicer_functions: list[str] = [
        "mlops_ray.serving.proto.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"]


class ServeCfg(Strict):
    app_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    detach: bool = False
    keep_alive: bool = True  # jobs.pipeline on ray.address=local: serve until Ctrl-C (false: exit)
    ready_timeout_s: float = Field(180, gt=0)
    ingress_mode: Literal["inline", "handle"] = "inline"
    # a local Ray started by this job: ingress replicas answer on their own port too (Serve's
    # direct ingress, RAY_SERVE_ENABLE_DIRECT_INGRESS), without the proxy hop
    direct_ingress: bool = True
    access_log: bool = False
    ingress: ServeDeploymentCfg = ServeDeploymentCfg(max_ongoing_requests=256)
    model: ServeDeploymentCfg = ServeDeploymentCfg()
    batching: BatchingCfg = BatchingCfg()
    limits: LimitsCfg = LimitsCfg()
    cache: CacheCfg = CacheCfg()
    auth: AuthCfg = AuthCfg()
    drift: DriftCfg = DriftCfg()
    feedback: FeedbackCfg = FeedbackCfg()
    live: LiveCfg = LiveCfg()
    prediction_log: PredictionLogCfg = PredictionLogCfg()
    rollout: RolloutCfg = RolloutCfg()
    grpc: GrpcCfg = GrpcCfg()

    @model_validator(mode="after")
    def _serve(self) -> ServeCfg:
        for part in ("ingress", "model"):
            auto = getattr(self, part).autoscaling_config
            if auto is None:
                continue
            from ray.serve.config import AutoscalingConfig
            try:
                AutoscalingConfig(**auto)
            except Exception as e:  # noqa: BLE001 - Ray's own validation names the field
                raise ValueError(f"serve.{part}.autoscaling_config: {e}") from None
        if self.model.autoscaling_config and self.ingress_mode == "inline":
            raise ValueError("serve.model.autoscaling_config scales the model deployments, "
                             "which serve.ingress_mode=inline does not use: set "
                             "serve.ingress_mode=handle, or serve.ingress.autoscaling_config")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix={self.route_prefix!r}: must start with '/'")
        if self.grpc.enabled and not self.grpc.servicer_functions:
            raise ValueError("serve.grpc.enabled=true needs serve.grpc.servicer_functions")
        return self


ACTIONS = ("serve", "rollout", "status", "drift", "rollback", "export")


class ServeJob(RegistrySections):
    """Serve `ref` (`action=serve`), or act on the app that serves its model."""
    ref: str  # registry ref: name@alias, name:VERSION, or name (= name@production)
    action: Literal["serve", "rollout", "status", "drift", "rollback", "export"] = "serve"
    to: str | None = None  # rollout: the alias whose version gets the traffic (default canary)
    out: str | None = None  # export: the Serve config file to write (None: stdout)
    strategy: Literal["canary", "bluegreen", "ab", "shadow"] | None = None
    serve: ServeCfg = ServeCfg()
    ray: RayCfg = RayCfg()

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return registry_ref(v)

    @property
    def model(self) -> str:
        """The registry model name of `ref`."""
        return self.ref.split("@", 1)[0].split(":", 1)[0]

    @property
    def app_name(self) -> str:
        return self.serve.app_name or self.model

    def endpoint(self) -> str:
        s = self.serve
        return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
