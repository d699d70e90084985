"""Deploy registry versions on Ray Serve and read what the ingress knows (the driver side).

Traffic only moves through the ingress's routing table (its `user_config`): a version's app is
started and checked ready first, then one reconfigure moves the traffic, then apps that no
longer receive traffic are deleted (Serve lets their in-flight requests finish). Rollouts and
rollbacks are rollout.py's; every traffic change is appended to the registry's audit chain.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlops_ray.config.serve import ServeCfg, ServeJob
from mlops_ray.errors import ServeError
from mlops_ray.registry import Registry, Version
from mlops_ray.serving.auth import LOOPBACK, api_keys


def code_version(*config: Any) -> str:
    """A Serve deployment version: the serving code plus the init arguments. Serve gives every
    `serve.run` of a Python app a random version and so replaces its replicas; pinning it makes
    a rerun with only a new `user_config` (routing, fault injection) a reconfigure in place."""
    from mlops_ray.utils import stable_hash
    here = Path(__file__).parent
    src = [(p.name, p.read_text()) for p in sorted(here.glob("*.py"))]
    return stable_hash([src, config], n=16)


def ingress_config(sj: ServeJob) -> dict[str, Any]:
    """The ingress's init arguments (core.IngressCfg), plain."""
    s = sj.serve
    return {"model_name": sj.model, "mode": s.ingress_mode, "storage": sj.storage.plain(),
            "cache": s.cache.plain(), "limits": s.limits.plain(), "drift": s.drift.plain(),
            "feedback": s.feedback.plain(), "api_keys": api_keys(s.auth),
            "prediction_log": s.prediction_log.plain(),
            "admin_keys_env": s.auth.admin_keys_env,
            "feedback_keys_env": s.auth.feedback_keys_env,
            # a replica off loopback refuses to start open (a Serve config on a cluster too)
            "require_keys": not s.host.startswith(LOOPBACK) and not s.auth.allow_anonymous,
            "app_name": sj.app_name, "push_interval_s": s.live.push_interval_s}


def deployment_options(s: ServeCfg, part: str) -> dict[str, Any]:
    """`.options()` of the ingress or model deployment from `serve.<part>` (Ray's names)."""
    d = getattr(s, part)
    opts = {"max_ongoing_requests": d.max_ongoing_requests,
            "ray_actor_options": d.ray_actor_options,
            "logging_config": {"enable_access_log": s.access_log}}
    if d.autoscaling_config:
        opts["autoscaling_config"] = d.autoscaling_config
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def serve_env(sj: ServeJob) -> None:
    """The environment Serve reads on a local Ray (set before Ray starts, and on the thread
    that will use Ray: the pipeline's early start sets it here, then starts Serve on another)."""
    local = sj.ray.address in (None, "local")  # the warm Ray has these from its start
    if sj.serve.direct_ingress and local:
        # read by the Serve controller and replicas of a throwaway local Ray; a replica that
        # stops keeps answering this long for load balancers to notice (Ray: 30 s): no load
        # balancer runs on a local cluster
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    elif sj.ray.address == "local" and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "0":
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"  # the proxy only, as configured


def serve_running() -> bool:
    """Whether Serve's controller runs on the cluster this process is attached to."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def start(sj: ServeJob) -> dict[str, Any]:
    """Ray (local or joined) and Serve's proxies, bound to serve.host."""
    from ray import serve

    from mlops_ray.runtime import ensure_ray
    from mlops_ray.serving.auth import check_bind
    check_bind(sj.serve.host, sj.serve.auth)  # off loopback: keys, or an explicit opt-out
    serve_env(sj)
    facts = ensure_ray(sj.ray.plain())
    s = sj.serve
    kw: dict[str, Any] = {"http_options": {"host": s.host, "port": s.port},
                          "logging_config": {"enable_access_log": s.access_log}}
    if s.grpc.enabled:  # Ray 2.60's gRPC proxy binds every interface: opt-in only
        kw["grpc_options"] = {"port": s.grpc.port,
                              "grpc_servicer_functions": s.grpc.servicer_functions}
    serve.start(**kw)
    _same_proxy(sj)
    return facts


def _same_proxy(sj: ServeJob) -> None:
    """Serve's HTTP proxy keeps the host and port it was first started with on a cluster (a
    warm Ray serving since an earlier job): say so rather than answer somewhere else."""
    import ray
    from ray.serve.context import _get_global_client
    try:
        client: Any = _get_global_client()
        http: Any = ray.get(client._controller.get_http_config.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - an older Serve: nothing to compare
        return
    if (http.host, int(http.port)) != (sj.serve.host, sj.serve.port):
        import sys
        print(f"warning: serve.host/serve.port={sj.serve.host}:{sj.serve.port}, but Serve on "
              f"this cluster already listens on {http.host}:{http.port}: its proxy answers "
              "there (each app's own replica port too); `make stop` the warm Ray to start "
              "Serve anew", file=sys.stderr)


def direct_endpoints(sj: ServeJob, timeout: float = 30, replicas: int = 1) -> list[str]:
    """URLs (route prefix included) of the ingress replicas answering by themselves (direct
    ingress), once `replicas` of them do; [] where the cluster runs without it."""
    import ray
    from ray.serve.context import _get_global_client
    deadline = time.monotonic() + timeout
    while True:
        try:  # Serve's controller knows the replica ports it handed out
            client: Any = _get_global_client()
            groups = ray.get(client._controller.get_target_groups.remote(sj.app_name),
                             timeout=10)
        except Exception:  # noqa: BLE001 - no controller, an older Serve: no direct path
            return []
        # a replica binds serve.host: on loopback it is reached there, not at the node's IP
        local = sj.serve.host.startswith(LOOPBACK)
        urls = sorted(f"http://{sj.serve.host if local else t.ip}:{t.port}"
                      f"{sj.serve.route_prefix.rstrip('/')}"
                      for g in groups
                      if str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP"
                      and g.app_name == sj.app_name for t in g.targets
                      if t.port != sj.serve.port)
        if len(urls) >= replicas:
            return urls
        if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1" or \
                time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def direct_endpoint(sj: ServeJob, timeout: float = 30) -> str | None:
    """The URL of an ingress replica answering by itself, or None (see direct_endpoints)."""
    urls = direct_endpoints(sj, timeout)
    return urls[0] if urls else None


def wait_ready(app: str, timeout: float) -> None:
    from ray import serve
    deadline = time.monotonic() + timeout
    while True:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            return
        if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeError(f"Serve app '{app}' is {st.status}: {st.message or ''}".strip())
        if time.monotonic() > deadline:
            raise ServeError(f"Serve app '{app}' not ready after {timeout:.0f} s "
                             f"({st.status if st else 'not found'})")
        time.sleep(0.25)


def deploy_version(sj: ServeJob, v: Version) -> dict[str, Any]:
    """Start the app of one registry version (if not running) and wait until it is ready."""
    from ray import serve

    from mlops_ray.serving.app import ModelServer
    s, name = sj.serve, f"{sj.app_name}-v{v.version}"
    if v.status == "deleted":
        raise ServeError(f"{v.ref} was deleted from the registry")
    spec = {"ref": v.ref, "version": v.version, "app": name, "artifact_uri": v.artifact_uri,
            "content_hash": v.content_hash,
            "chaos_error_rate": float(s.model.chaos_error_rate or 0.0)}
    if s.ingress_mode == "inline":  # the ingress loads it (and checks it) before routing
        return {**spec, "app": None}
    # an app being deleted (a version that just lost its traffic) must be gone before re-use
    wait_gone = time.monotonic() + s.ready_timeout_s
    while (st := serve.status().applications.get(name)) is not None \
            and st.status == "DELETING" and time.monotonic() < wait_gone:
        time.sleep(0.25)
    # serve.run is idempotent: an unchanged app is left alone, a new user_config is applied
    opts = deployment_options(s, "model")
    opts["user_config"] = {"chaos_error_rate": float(s.model.chaos_error_rate or 0.0)}
    args = (v.artifact_uri, v.content_hash, v.ref, sj.storage.plain(), s.batching.plain())
    opts["version"] = code_version(args, {k: v for k, v in opts.items() if k != "user_config"})
    # mypy ignores class decorators: @serve.deployment made ModelServer a Deployment
    serve.run(ModelServer.options(**opts, _internal=True)  # type: ignore[attr-defined]
              .bind(*args), name=name, route_prefix=None, blocking=False)
    wait_ready(name, s.ready_timeout_s)
    return spec


def arm(spec: dict[str, Any], weight: float, role: str) -> dict[str, Any]:
    return {**spec, "weight": float(weight), "role": role}


def export_config(sj: ServeJob, reg: Registry) -> dict[str, Any]:
    """A Serve config file (ServeDeploySchema) serving `ref`, pinned to the version it names
    now: its artifact URI and content hash are written into the config, so the cluster needs
    the artifact storage but not the registry database, and re-exporting after a promotion and
    re-applying it is the rollout (the ingress reconfigures in place)."""
    from ray.serve.schema import ServeDeploySchema
    s = sj.serve
    if s.ingress_mode != "inline":
        raise ServeError("serve.ingress_mode=handle deploys one application per version from "
                         "this process; a config file holds the inline ingress only")
    v = reg.get(sj.ref)
    if v.status == "deleted":
        raise ServeError(f"{v.ref} was deleted from the registry")
    spec = {"ref": v.ref, "version": v.version, "app": None, "artifact_uri": v.artifact_uri,
            "content_hash": v.content_hash, "chaos_error_rate": 0.0}
    routing = {"arms": [arm(spec, 100, "stable")], "mode": "weighted", "previous": None}
    opts = deployment_options(s, "ingress")
    dep = {"name": "Ingress", "user_config": routing,
           "max_ongoing_requests": opts["max_ongoing_requests"],
           "ray_actor_options": opts["ray_actor_options"],
           **({"autoscaling_config": opts["autoscaling_config"]} if "autoscaling_config" in opts
              else {"num_replicas": opts["num_replicas"]})}
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.port},
        "logging_config": {"enable_access_log": s.access_log},
        "applications": [{"name": sj.app_name, "route_prefix": s.route_prefix,
                          "import_path": "mlops_ray.serving.app:build_app",
                          # keys never go into the file: the replicas read the variable
                          "args": {"ingress": {**ingress_config(sj), "api_keys": [],
                                              "api_keys_env": s.auth.api_keys_env}},
                          "deployments": [dep]}],
    }
    ServeDeploySchema.parse_obj(config)  # Serve's own validation of the file we write
    return config


_LOOP: Any = None


def _call(sj: ServeJob, method: str) -> Any:
    """`Ingress.<method>()` through a Serve handle, awaited on one event loop of this process
    (a daemon thread): handles then work under Ray's throughput settings too
    (RAY_SERVE_THROUGHPUT_OPTIMIZED runs a handle's router in the caller's loop, which a
    blocking `.result()` from synchronous code does not have)."""
    import asyncio
    import threading

    from ray import serve
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="serve-handles", daemon=True).start()

    async def go() -> Any:
        return await getattr(serve.get_deployment_handle("Ingress", sj.app_name), method).remote()
    return asyncio.run_coroutine_threadsafe(go(), _LOOP).result()


def current_routing(sj: ServeJob) -> dict[str, Any] | None:
    from ray import serve
    if sj.app_name not in serve.status().applications:
        return None
    return _call(sj, "routing_state")


def stats(sj: ServeJob) -> dict[str, Any]:
    """The app's statistics over all its ingress replicas (its hub, hub.py)."""
    return _call(sj, "stats")


def drift(sj: ServeJob) -> dict[str, Any]:
    return _call(sj, "drift_table")


def reset_hub(sj: ServeJob) -> None:
    """A new live hub for an app deployed anew (no statistics of an earlier app by its name)."""
    from mlops_ray.serving.hub import hub_for
    s = sj.serve
    hub_for(sj.app_name, sj.model, s.drift.plain(), s.feedback.plain(), fresh=True)


def set_routing(sj: ServeJob, routing: dict[str, Any]) -> None:
    from ray import serve

    from mlops_ray.serving.app import Ingress
    s = sj.serve
    opts = deployment_options(s, "ingress")
    cfg = ingress_config(sj)
    # a Deployment, as ModelServer above
    serve.run(Ingress.options(**opts, user_config=routing,  # type: ignore[attr-defined]
                              version=code_version(cfg, opts), _internal=True).bind(cfg),
              name=sj.app_name, route_prefix=s.route_prefix, blocking=False)
    wait_ready(sj.app_name, s.ready_timeout_s)
    got = current_routing(sj) or {}
    if [a["ref"] for a in got.get("arms", [])] != [a["ref"] for a in routing["arms"]]:
        raise ServeError(f"the ingress kept its routing: {got.get('load_error') or 'unknown'}")


def cleanup(sj: ServeJob, routing: dict[str, Any]) -> list[str]:
    """Delete version apps that receive no traffic any more."""
    from ray import serve
    keep = {a["app"] for a in routing["arms"] if a.get("app")}
    prefix = f"{sj.app_name}-v"
    gone = [a for a in serve.status().applications if a.startswith(prefix) and a not in keep]
    for a in gone:
        serve.delete(a, _blocking=False)
    return gone


def audit(reg: Registry, sj: ServeJob, action: str, version: int | None,
          **details: Any) -> None:
    reg.record(action, sj.model, version, reason=details.pop("reason", None),
               details={"app": sj.app_name, **details})
