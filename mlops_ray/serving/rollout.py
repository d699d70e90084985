"""What the app serves: the first deployment of a version (`serve_ref`), rollouts onto the
running app (blue-green, canary rolled back on its own, A/B, shadow) and rollback to the
previous routing. The new version is started and checked ready before any
traffic moves; every traffic change and rollback is in the registry's audit chain."""
from __future__ import annotations

import time
from typing import Any

from mlops_ray.config.serve import ServeJob
from mlops_ray.errors import ServeError
from mlops_ray.registry import Registry
from mlops_ray.serving.control import (
    arm,
    audit,
    cleanup,
    current_routing,
    deploy_version,
    reset_hub,
    set_routing,
    stats,
)


def _stable_arms(routing: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [a for a in (routing or {}).get("arms", []) if a["role"] == "stable"]


def _target(sj: ServeJob, to: str) -> tuple[str, str]:
    """(registry ref, what to call it): an alias of the job's model, or a full ref."""
    if "@" in to or ":" in to:
        return to, to.split("@", 1)[1] if "@" in to else to
    return f"{sj.model}@{to}", to


def breach(canary: dict[str, Any], stable: dict[str, Any] | None, r: Any) -> str | None:
    """Why a canary must roll back (None: it may go on), once it answered min_requests."""
    if canary["requests"] < r.min_requests:
        return None
    if canary["error_rate"] > r.max_error_rate:
        return (f"error rate {canary['error_rate']:.3f} > {r.max_error_rate} "
                f"({canary['errors']} of {canary['requests']} requests)")
    if canary["p99_ms"] is not None and canary["p99_ms"] > r.max_p99_ms:
        return f"p99 latency {canary['p99_ms']:.0f} ms > {r.max_p99_ms} ms"
    if stable and stable.get("mean_probability") is not None \
            and canary["mean_probability"] is not None and canary.get("shift_p") is not None:
        # a large difference of means that a KS test also finds real, not two small samples
        shift = abs(canary["mean_probability"] - stable["mean_probability"])
        if shift > r.max_prediction_shift and canary["shift_p"] < 0.01:
            return (f"prediction shift {shift:.3f} > {r.max_prediction_shift} (mean "
                    f"probability {canary['mean_probability']:.3f} vs stable "
                    f"{stable['mean_probability']:.3f})")
    return None


def may_serve(reg: Registry, sj: ServeJob, v: Any, action: str, answers: bool = True) -> None:
    """Checked before any traffic moves: the caller's role (deploy), and that a version which
    will answer clients passed its gates (or is production, where only an admin's audited
    --force puts a failed one)."""
    reg.require("deploy", action, model=sj.model, version=v.version)
    if answers and not v.gate_passed and reg.aliases(sj.model).get("production") != v.version:
        raise ServeError(f"{v.ref} failed its validation gates: it may not answer clients "
                         "(strategy=shadow only copies traffic to it)")


def rollout(sj: ServeJob, reg: Registry, to: str, strategy: str, log: Any = print
            ) -> dict[str, Any]:
    """Move traffic to `to` (an alias of the model, or a ref) by `strategy`; canaries roll
    back on their own."""
    r = sj.serve.rollout
    ref, alias = _target(sj, to)
    v = reg.get(ref)
    may_serve(reg, sj, v, f"traffic_{strategy}", answers=strategy != "shadow")
    cur = current_routing(sj)
    old = _stable_arms(cur)
    if not old:
        raise ServeError(f"app '{sj.app_name}' is not serving; start it with "
                         f"`python -m jobs.serve ref={sj.model}` first")
    if any(a["ref"] == v.ref for a in old):
        raise ServeError(f"{v.ref} ({ref}) is already the stable version")
    stable = old[0]
    spec = deploy_version(sj, v)  # started and ready before any traffic moves
    log(f"{v.ref} is ready (app '{spec['app'] or sj.app_name + ', inline'}'); "
        f"strategy {strategy}")
    prev = [arm(stable, 100, "stable")]
    if strategy == "bluegreen":
        routing: dict[str, Any] = {"arms": [arm(spec, 100, "stable")], "mode": "weighted",
                                   "previous": prev}
    elif strategy == "ab":
        wa, wb = r.ab_weights
        routing = {"arms": [arm(stable, wa, "stable"), arm(spec, wb, "b")], "mode": "ab",
                   "ab_key": r.ab_key, "previous": prev}
    elif strategy == "shadow":
        routing = {"arms": [arm(stable, 100, "stable"), arm(spec, 0, "shadow")],
                   "mode": "weighted", "previous": prev}
    elif strategy == "canary":
        return _canary(sj, reg, alias, stable, spec, log)
    else:
        raise ServeError(f"strategy={strategy!r}: allowed canary, bluegreen, ab, shadow")
    set_routing(sj, routing)
    audit(reg, sj, "traffic", v.version, strategy=strategy, alias=alias,
          arms={a["ref"]: a["weight"] for a in routing["arms"]},
          roles={a["ref"]: a["role"] for a in routing["arms"]})
    if strategy == "bluegreen":
        cleanup(sj, routing)
    log(f"{strategy}: " + ", ".join(f"{a['ref']} {a['role']} {a['weight']:g}"
                                    for a in routing["arms"]))
    return routing


RUNNER_NAMESPACE = "mlops_ray"


class CanaryRunner:
    """Steps canaries inside the cluster: one detached actor per app (`mlops-rollout-<app>`).
    The `jobs.serve action=rollout` process only starts it and follows its log, so if that
    process dies the canary still completes or rolls back on schedule."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.running = False

    def run(self, job: dict[str, Any], registry: tuple[str, Any, str], to: str,
            stable: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        from mlops_ray.storage import from_cfg
        self.lines, self.running = [], True
        try:
            sj = ServeJob.model_validate(job)
            # the caller's registry, on behalf of the caller whose deploy role rollout() checked
            url, policy, actor = registry
            reg = Registry(url, from_cfg(sj.storage.plain()), policy, actor=actor)
            return {"routing": step_canary(sj, reg, to, stable, spec, self.lines.append)}
        except Exception as e:  # noqa: BLE001 - returned to the caller, if it is still there
            return {"error": str(e), "type": type(e).__name__}
        finally:
            self.running = False

    def busy(self) -> bool:
        return self.running

    def log_since(self, n: int) -> list[str]:
        return self.lines[n:]


def _canary(sj: ServeJob, reg: Registry, to: str, stable: dict[str, Any],
            spec: dict[str, Any], log: Any) -> dict[str, Any]:
    """Run the canary in the app's runner actor and follow it (its log lines, its result)."""
    import ray
    remote: Any = ray.remote  # typed for functions; the actor options are Ray's own
    runner = remote(num_cpus=0, max_concurrency=4)(CanaryRunner).options(
        name=f"mlops-rollout-{sj.app_name}", namespace=RUNNER_NAMESPACE, lifetime="detached",
        get_if_exists=True).remote()
    if ray.get(runner.busy.remote()):
        raise ServeError(f"a canary of app '{sj.app_name}' is being stepped already")
    done_ref = runner.run.remote(sj.plain(), (reg.url, reg.policy, reg.actor), to, stable, spec)
    seen = 0
    while True:
        done, _ = ray.wait([done_ref], timeout=sj.serve.rollout.poll_s)
        lines = ray.get(runner.log_since.remote(seen))
        for line in lines:
            log(line)
        seen += len(lines)
        if done:
            break
    out = ray.get(done_ref)
    for line in ray.get(runner.log_since.remote(seen)):
        log(line)
    if "error" in out:
        raise ServeError(out["error"])
    return out["routing"]


def step_canary(sj: ServeJob, reg: Registry, to: str, stable: dict[str, Any],
                spec: dict[str, Any], log: Any) -> dict[str, Any]:
    """The canary's steps: weights up while it bakes within the rules; its own rollback."""
    r = sj.serve.rollout
    prev = [arm(stable, 100, "stable")]
    for step in r.steps:
        if step >= 100:
            break
        routing = {"arms": [arm(stable, 100 - step, "stable"), arm(spec, step, "canary")],
                   "mode": "weighted", "previous": prev}
        set_routing(sj, routing)
        audit(reg, sj, "traffic", spec["version"], strategy="canary", alias=to,
              arms={stable["ref"]: 100 - step, spec["ref"]: step})
        _canary_metric(sj, spec, step)
        log(f"canary {spec['ref']} at {step}%: baking {r.bake_s} s")
        # a step ends after bake_s *and* min_requests canary requests: a canary is never
        # passed for want of traffic; none within max_bake_s rolls it back (inconclusive)
        t0 = time.monotonic()
        while True:
            time.sleep(r.poll_s)
            st = stats(sj)["arms"]
            why = breach(st[spec["ref"]], st.get(stable["ref"]), r)
            if why:
                return _abort(sj, reg, to, stable, spec, why, st[spec["ref"]], log)
            waited, seen = time.monotonic() - t0, st[spec["ref"]]["requests"]
            if waited >= r.bake_s and seen >= r.min_requests:
                break
            if waited >= r.max_bake_s:
                why = (f"inconclusive: {seen} request(s) routed to it in {waited:.0f} s, "
                       f"fewer than serve.rollout.min_requests={r.min_requests}")
                return _abort(sj, reg, to, stable, spec, why, st[spec["ref"]], log)
    final = {"arms": [arm(spec, 100, "stable")], "mode": "weighted", "previous": prev}
    set_routing(sj, final)
    audit(reg, sj, "traffic", spec["version"], strategy="canary", alias=to,
          arms={spec["ref"]: 100}, completed=True)
    cleanup(sj, final)
    _canary_metric(sj, spec, 100, "promoted")
    log(f"canary {spec['ref']} completed: 100% of traffic")
    return final


def _canary_metric(sj: ServeJob, spec: dict[str, Any], percent: float,
                   outcome: str | None = None) -> None:
    """`ray_mlops_rollout_*` (dashboard: canary state; alert: a rollback)."""
    from mlops_ray.metrics import metric
    metric("mlops_rollout_canary_percent").set(
        percent, tags={"model": sj.model, "version": str(spec["version"])})
    if outcome:
        metric("mlops_rollout_events").inc(tags={"model": sj.model, "outcome": outcome})


def _abort(sj: ServeJob, reg: Registry, to: str, stable: dict[str, Any],
           spec: dict[str, Any], why: str, canary_stats: dict[str, Any], log: Any
           ) -> dict[str, Any]:
    back = {"arms": [arm(stable, 100, "stable")], "mode": "weighted", "previous": None}
    set_routing(sj, back)
    cleanup(sj, back)
    _canary_metric(sj, spec, 0, "rolled_back")
    answered = canary_stats["requests"] - canary_stats["errors"]
    audit(reg, sj, "rollback", stable["version"], reason=f"canary {spec['ref']}: {why}",
          automatic=True, canary_requests=canary_stats["requests"], canary_answered=answered)
    if to == "production" and reg.aliases(sj.model).get("production") == spec["version"]:
        reg.rollback(sj.model, "production", f"automatic canary rollback: {why}")
    raise ServeError(f"canary {spec['ref']} rolled back to {stable['ref']}: {why}; it answered "
                     f"{answered} request(s) ({canary_stats['requests']} routed to it)")


def serve_ref(sj: ServeJob, reg: Registry, ref: str | None = None, log: Any = print
              ) -> dict[str, Any]:
    """Serve `ref` (default: the job's): the first deployment, or a blue-green switch when
    the app runs."""
    ref = ref or sj.ref
    v = reg.get(ref)
    cur = current_routing(sj)
    if cur and [a["ref"] for a in cur["arms"]] == [v.ref]:
        log(f"{v.ref} is already served by '{sj.app_name}'")
        return cur
    if cur:
        return rollout(sj, reg, ref, "bluegreen", log)
    may_serve(reg, sj, v, "deploy")
    reset_hub(sj)  # an app deployed anew starts its statistics anew
    spec = deploy_version(sj, v)
    routing = {"arms": [arm(spec, 100, "stable")], "mode": "weighted", "previous": None}
    set_routing(sj, routing)
    alias = ref.split("@", 1)[1] if "@" in ref else None
    audit(reg, sj, "deploy", v.version, alias=alias, arms=[v.ref])
    log(f"serving {v.ref} ({ref}) as app '{sj.app_name}'")
    return routing


def serve_alias(sj: ServeJob, reg: Registry, alias: str, log: Any = print) -> dict[str, Any]:
    """Serve `<model>@alias`."""
    return serve_ref(sj, reg, f"{sj.model}@{alias}", log)


def rollback(sj: ServeJob, reg: Registry, log: Any = print) -> dict[str, Any]:
    """Traffic back to the version that was stable before the last change."""
    cur = current_routing(sj)
    if not cur or not cur.get("previous"):
        raise ServeError(f"app '{sj.app_name}': no earlier routing to roll back to")
    prev = cur["previous"]
    reg.require("deploy", "traffic_rollback", model=sj.model, version=prev[0]["version"])
    routing = {"arms": prev, "mode": "weighted", "previous": None}
    for a in prev:  # its app may have been deleted after the switch
        deploy_version(sj, reg.get(a["ref"]))
    set_routing(sj, routing)
    audit(reg, sj, "rollback", prev[0]["version"], reason="jobs.serve rollback",
          automatic=False, arms=[a["ref"] for a in prev])
    cleanup(sj, routing)
    log(f"rolled back to {prev[0]['ref']}")
    return routing
