"""Deploy, roll out and roll back registry versions on Ray Serve (the driver side).

Traffic only moves through the ingress's routing table (its `user_config`): a version's app is
started and checked ready first, then one reconfigure moves the traffic, then apps that no
longer receive traffic are deleted (Serve lets their in-flight requests finish). Every traffic
change and rollback is appended to the registry's audit chain.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlops_ray.errors import MlopsError
from mlops_ray.registry import Registry, Version


class ServeError(MlopsError):
    """A Serve application failed to deploy, or a rollout was rolled back."""

    exit_code = 10


def code_version(*config: Any) -> str:
    """A Serve deployment version: the serving code plus the init arguments. Serve gives every
    `serve.run` of a Python app a random version and so replaces its replicas; pinning it makes
    a rerun with only a new `user_config` (routing, fault injection) a reconfigure in place."""
    from mlops_ray.utils import stable_hash
    here = Path(__file__).parent
    src = [(p.name, p.read_text()) for p in sorted(here.glob("*.py"))]
    return stable_hash([src, config], n=16)


def app_name(job: dict[str, Any]) -> str:
    return job["serve"]["app_name"] or job["model"]


def api_keys(auth: dict[str, Any]) -> list[str]:
    keys = list(auth.get("api_keys") or [])
    if auth.get("api_keys_env") and os.environ.get(auth["api_keys_env"]):
        keys += [k.strip() for k in os.environ[auth["api_keys_env"]].split(",") if k.strip()]
    if auth.get("key_file"):
        keys += [k.strip() for k in Path(auth["key_file"]).expanduser().read_text().splitlines()
                 if k.strip() and not k.startswith("#")]
    return keys


def ingress_config(job: dict[str, Any]) -> dict[str, Any]:
    s = job["serve"]
    return {"model_name": job["model"], "mode": s["ingress_mode"], "storage": job["storage"],
            "cache": s["cache"],
            "limits": s["limits"], "drift": s["drift"], "feedback": s["feedback"],
            "api_keys": api_keys(s["auth"])}


def deployment_options(s: dict[str, Any], part: str) -> dict[str, Any]:
    """`.options()` of the ingress or model deployment from `serve.<part>` (Ray's names)."""
    d = s[part]
    opts = {k: d[k] for k in ("max_ongoing_requests", "ray_actor_options")}
    opts["logging_config"] = {"enable_access_log": s["access_log"]}
    if d["autoscaling_config"]:
        opts["autoscaling_config"] = d["autoscaling_config"]
    else:
        opts["num_replicas"] = d["num_replicas"]
    return opts


def start(job: dict[str, Any]) -> dict[str, Any]:
    """Ray (local or joined) and Serve's proxies, bound to serve.host."""
    from ray import serve

    from mlops_ray.runtime import ensure_ray
    facts = ensure_ray(job["ray"])
    s = job["serve"]
    kw: dict[str, Any] = {"http_options": {"host": s["host"], "port": s["port"]},
                          "logging_config": {"enable_access_log": s["access_log"]}}
    if s["grpc"]["enabled"]:  # Ray 2.60's gRPC proxy binds every interface: opt-in only
        kw["grpc_options"] = {"port": s["grpc"]["port"],
                              "grpc_servicer_functions": s["grpc"]["servicer_functions"]}
    serve.start(**kw)
    return facts


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


def deploy_version(job: dict[str, Any], v: Version) -> dict[str, Any]:
    """Start the app of one registry version (if not running) and wait until it is ready."""
    from ray import serve

    from mlops_ray.serving.app import ModelServer
    s, name = job["serve"], f"{app_name(job)}-v{v.version}"
    if v.status == "deleted":
        raise ServeError(f"{v.ref} was deleted from the registry")
    spec = {"ref": v.ref, "version": v.version, "app": name, "artifact_uri": v.artifact_uri,
            "content_hash": v.content_hash,
            "chaos_error_rate": float(s["model"]["chaos_error_rate"] or 0.0)}
    if s["ingress_mode"] == "inline":  # the ingress loads it (and checks it) before routing
        return {**spec, "app": None}
    # an app being deleted (a version that just lost its traffic) must be gone before re-use
    wait_gone = time.monotonic() + s["ready_timeout_s"]
    while (st := serve.status().applications.get(name)) is not None \
            and st.status == "DELETING" and time.monotonic() < wait_gone:
        time.sleep(0.25)
    # serve.run is idempotent: an unchanged app is left alone, a new user_config is applied
    opts = deployment_options(s, "model")
    opts["user_config"] = {"chaos_error_rate": float(s["model"]["chaos_error_rate"] or 0.0)}
    args = (v.artifact_uri, v.content_hash, v.ref, job["storage"], s["batching"])
    opts["version"] = code_version(args, {k: v for k, v in opts.items() if k != "user_config"})
    # mypy ignores class decorators: @serve.deployment made ModelServer a Deployment
    serve.run(ModelServer.options(**opts, _internal=True)  # type: ignore[attr-defined]
              .bind(*args), name=name, route_prefix=None, blocking=False)
    wait_ready(name, s["ready_timeout_s"])
    return spec


def export_config(job: dict[str, Any], reg: Registry) -> dict[str, Any]:
    """A Serve config file (ServeDeploySchema) serving `model@alias`, pinned to the version the
    alias names now: its artifact URI and content hash are written into the config, so the
    cluster needs the artifact storage but not the registry database, and re-exporting after a
    promotion and re-applying it is the rollout (the ingress reconfigures in place)."""
    from ray.serve.schema import ServeDeploySchema
    s = job["serve"]
    if s["ingress_mode"] != "inline":
        raise ServeError("serve.ingress_mode=handle deploys one application per version from "
                         "this process; a config file holds the inline ingress only")
    v = reg.get(f"{job['model']}@{job['alias']}")
    if v.status == "deleted":
        raise ServeError(f"{v.ref} was deleted from the registry")
    spec = {"ref": v.ref, "version": v.version, "app": None, "artifact_uri": v.artifact_uri,
            "content_hash": v.content_hash, "chaos_error_rate": 0.0}
    routing = {"arms": [_arm(spec, 100, "stable")], "mode": "weighted", "previous": None}
    opts = deployment_options(s, "ingress")
    dep = {"name": "Ingress", "user_config": routing,
           "max_ongoing_requests": opts["max_ongoing_requests"],
           "ray_actor_options": opts["ray_actor_options"],
           **({"autoscaling_config": opts["autoscaling_config"]} if "autoscaling_config" in opts
              else {"num_replicas": opts["num_replicas"]})}
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": s["host"], "port": s["port"]},
        "logging_config": {"enable_access_log": s["access_log"]},
        "applications": [{"name": app_name(job), "route_prefix": s["route_prefix"],
                          "import_path": "mlops_ray.serving.app:build_app",
                          # keys never go into the file: the replicas read the variable
                          "args": {"ingress": {**ingress_config(job), "api_keys": [],
                                              "api_keys_env": s["auth"]["api_keys_env"]}},
                          "deployments": [dep]}],
    }
    ServeDeploySchema.parse_obj(config)  # Serve's own validation of the file we write
    return config


def current_routing(job: dict[str, Any]) -> dict[str, Any] | None:
    from ray import serve
    if app_name(job) not in serve.status().applications:
        return None
    return serve.get_deployment_handle("Ingress", app_name(job)).routing_state.remote().result()


def stats(job: dict[str, Any]) -> dict[str, Any]:
    from ray import serve
    return serve.get_deployment_handle("Ingress", app_name(job)).stats.remote().result()


def drift(job: dict[str, Any]) -> dict[str, Any]:
    from ray import serve
    return serve.get_deployment_handle("Ingress", app_name(job)).drift_table.remote().result()


def set_routing(job: dict[str, Any], routing: dict[str, Any]) -> None:
    from ray import serve

    from mlops_ray.serving.app import Ingress
    s = job["serve"]
    opts = deployment_options(s, "ingress")
    cfg = ingress_config(job)
    # a Deployment, as ModelServer above
    serve.run(Ingress.options(**opts, user_config=routing,  # type: ignore[attr-defined]
                              version=code_version(cfg, opts), _internal=True).bind(cfg),
              name=app_name(job), route_prefix=s["route_prefix"], blocking=False)
    wait_ready(app_name(job), s["ready_timeout_s"])
    got = current_routing(job) or {}
    if [a["ref"] for a in got.get("arms", [])] != [a["ref"] for a in routing["arms"]]:
        raise ServeError(f"the ingress kept its routing: {got.get('load_error') or 'unknown'}")


def _cleanup(job: dict[str, Any], routing: dict[str, Any]) -> list[str]:
    """Delete version apps that receive no traffic any more."""
    from ray import serve
    keep = {a["app"] for a in routing["arms"] if a.get("app")}
    prefix = f"{app_name(job)}-v"
    gone = [a for a in serve.status().applications if a.startswith(prefix) and a not in keep]
    for a in gone:
        serve.delete(a, _blocking=False)
    return gone


def _arm(spec: dict[str, Any], weight: float, role: str) -> dict[str, Any]:
    return {**spec, "weight": float(weight), "role": role}


def _stable_arms(routing: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [a for a in (routing or {}).get("arms", []) if a["role"] == "stable"]


def _audit(reg: Registry, job: dict[str, Any], action: str, version: int | None,
           **details: Any) -> None:
    reg.record(action, job["model"], version, reason=details.pop("reason", None),
               details={"app": app_name(job), **details})


def serve_alias(job: dict[str, Any], reg: Registry, alias: str, log: Any = print
                ) -> dict[str, Any]:
    """Serve `model@alias`: the first deployment, or a blue-green switch when the app runs."""
    v = reg.get(f"{job['model']}@{alias}")
    cur = current_routing(job)
    if cur and [a["ref"] for a in cur["arms"]] == [v.ref]:
        log(f"{v.ref} is already served by '{app_name(job)}'")
        return cur
    if cur:
        return rollout(job, reg, alias, "bluegreen", log)
    spec = deploy_version(job, v)
    routing = {"arms": [_arm(spec, 100, "stable")], "mode": "weighted", "previous": None}
    set_routing(job, routing)
    _audit(reg, job, "deploy", v.version, alias=alias, arms=[v.ref])
    log(f"serving {v.ref} ({job['model']}@{alias}) as app '{app_name(job)}'")
    return routing


def _breach(canary: dict[str, Any], stable: dict[str, Any] | None, r: dict[str, Any]
            ) -> str | None:
    if canary["requests"] < r["min_requests"]:
        return None
    if canary["error_rate"] > r["max_error_rate"]:
        return (f"error rate {canary['error_rate']:.3f} > {r['max_error_rate']} "
                f"({canary['errors']} of {canary['requests']} requests)")
    if canary["p99_ms"] is not None and canary["p99_ms"] > r["max_p99_ms"]:
        return f"p99 latency {canary['p99_ms']:.0f} ms > {r['max_p99_ms']} ms"
    if stable and stable.get("mean_probability") is not None \
            and canary["mean_probability"] is not None and canary.get("shift_p") is not None:
        # a large difference of means that a KS test also finds real, not two small samples
        shift = abs(canary["mean_probability"] - stable["mean_probability"])
        if shift > r["max_prediction_shift"] and canary["shift_p"] < 0.01:
            return (f"prediction shift {shift:.3f} > {r['max_prediction_shift']} (mean "
                    f"probability {canary['mean_probability']:.3f} vs stable "
                    f"{stable['mean_probability']:.3f})")
    return None


def rollout(job: dict[str, Any], reg: Registry, to: str, strategy: str, log: Any = print
            ) -> dict[str, Any]:
    """Move traffic to `model@to` by `strategy`; canaries roll back on their own."""
    r = job["serve"]["rollout"]
    v = reg.get(f"{job['model']}@{to}")
    cur = current_routing(job)
    old = _stable_arms(cur)
    if not old:
        raise ServeError(f"app '{app_name(job)}' is not serving; start it with "
                         f"`python -m jobs.serve model={job['model']}` first")
    if any(a["ref"] == v.ref for a in old):
        raise ServeError(f"{v.ref} ({job['model']}@{to}) is already the stable version")
    stable = old[0]
    spec = deploy_version(job, v)  # started and ready before any traffic moves
    log(f"{v.ref} is ready (app '{spec['app'] or app_name(job) + ', inline'}'); "
        f"strategy {strategy}")
    prev = [_arm(stable, 100, "stable")]
    if strategy == "bluegreen":
        routing: dict[str, Any] = {"arms": [_arm(spec, 100, "stable")], "mode": "weighted",
                                   "previous": prev}
    elif strategy == "ab":
        wa, wb = r["ab_weights"]
        routing = {"arms": [_arm(stable, wa, "stable"), _arm(spec, wb, "b")], "mode": "ab",
                   "ab_key": r["ab_key"], "previous": prev}
    elif strategy == "shadow":
        routing = {"arms": [_arm(stable, 100, "stable"), _arm(spec, 0, "shadow")],
                   "mode": "weighted", "previous": prev}
    elif strategy == "canary":
        return _canary(job, reg, to, stable, spec, log)
    else:
        raise ServeError(f"strategy={strategy!r}: allowed canary, bluegreen, ab, shadow")
    set_routing(job, routing)
    _audit(reg, job, "traffic", v.version, strategy=strategy, alias=to,
           arms={a["ref"]: a["weight"] for a in routing["arms"]},
           roles={a["ref"]: a["role"] for a in routing["arms"]})
    if strategy == "bluegreen":
        _cleanup(job, routing)
    log(f"{strategy}: " + ", ".join(f"{a['ref']} {a['role']} {a['weight']:g}"
                                    for a in routing["arms"]))
    return routing


def _canary(job: dict[str, Any], reg: Registry, to: str, stable: dict[str, Any],
            spec: dict[str, Any], log: Any) -> dict[str, Any]:
    r = job["serve"]["rollout"]
    prev = [_arm(stable, 100, "stable")]
    for step in r["steps"]:
        if step >= 100:
            break
        routing = {"arms": [_arm(stable, 100 - step, "stable"), _arm(spec, step, "canary")],
                   "mode": "weighted", "previous": prev}
        set_routing(job, routing)
        _audit(reg, job, "traffic", spec["version"], strategy="canary", alias=to,
               arms={stable["ref"]: 100 - step, spec["ref"]: step})
        log(f"canary {spec['ref']} at {step}%: baking {r['bake_s']} s")
        # a step ends after bake_s *and* min_requests canary requests: a canary is never
        # passed for want of traffic; none within max_bake_s rolls it back (inconclusive)
        t0 = time.monotonic()
        while True:
            time.sleep(r["poll_s"])
            st = stats(job)["arms"]
            why = _breach(st[spec["ref"]], st.get(stable["ref"]), r)
            if why:
                return _abort(job, reg, to, stable, spec, why, st[spec["ref"]], log)
            waited, seen = time.monotonic() - t0, st[spec["ref"]]["requests"]
            if waited >= r["bake_s"] and seen >= r["min_requests"]:
                break
            if waited >= r["max_bake_s"]:
                why = (f"inconclusive: {seen} request(s) routed to it in {waited:.0f} s, "
                       f"fewer than serve.rollout.min_requests={r['min_requests']}")
                return _abort(job, reg, to, stable, spec, why, st[spec["ref"]], log)
    final = {"arms": [_arm(spec, 100, "stable")], "mode": "weighted", "previous": prev}
    set_routing(job, final)
    _audit(reg, job, "traffic", spec["version"], strategy="canary", alias=to,
           arms={spec["ref"]: 100}, completed=True)
    _cleanup(job, final)
    log(f"canary {spec['ref']} completed: 100% of traffic")
    return final


def _abort(job: dict[str, Any], reg: Registry, to: str, stable: dict[str, Any],
           spec: dict[str, Any], why: str, canary_stats: dict[str, Any], log: Any
           ) -> dict[str, Any]:
    back = {"arms": [_arm(stable, 100, "stable")], "mode": "weighted", "previous": None}
    set_routing(job, back)
    _cleanup(job, back)
    answered = canary_stats["requests"] - canary_stats["errors"]
    _audit(reg, job, "rollback", stable["version"], reason=f"canary {spec['ref']}: {why}",
           automatic=True, canary_requests=canary_stats["requests"],
           canary_answered=answered)
    if to == "production" and reg.aliases(job["model"]).get("production") == spec["version"]:
        reg.rollback(job["model"], "production", f"automatic canary rollback: {why}")
    raise ServeError(f"canary {spec['ref']} rolled back to {stable['ref']}: {why}; it answered "
                     f"{answered} request(s) ({canary_stats['requests']} routed to it)")


def rollback(job: dict[str, Any], reg: Registry, log: Any = print) -> dict[str, Any]:
    """Traffic back to the version that was stable before the last change."""
    cur = current_routing(job)
    if not cur or not cur.get("previous"):
        raise ServeError(f"app '{app_name(job)}': no earlier routing to roll back to")
    prev = cur["previous"]
    routing = {"arms": prev, "mode": "weighted", "previous": None}
    for a in prev:  # its app may have been deleted after the switch
        deploy_version(job, reg.get(a["ref"]))
    set_routing(job, routing)
    _audit(reg, job, "rollback", prev[0]["version"], reason="jobs.serve rollback",
           automatic=False, arms=[a["ref"] for a in prev])
    _cleanup(job, routing)
    log(f"rolled back to {prev[0]['ref']}")
    return routing
