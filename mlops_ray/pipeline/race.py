"""Racing model families (`candidates=[mlp,xgboost]`): each candidate is trained and judged by
the same gates, on the same prepared data, as its own run; the best one that passes (by
cv/auc_mean: chosen on the folds, not on the test rows) goes on to promotion. Every candidate,
passed or not, is in the pipeline record. None passing is a GateFailed naming each one's
failed gates, audited like a single candidate's."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from mlops_ray.errors import GateFailed
from mlops_ray.pipeline.context import Context

SELECT_BY = "cv/auc_mean"


def candidate_job(job: Any, name: str) -> Any:
    """The pipeline job with conf/model/<name>.yaml as its model (the job's own model when
    it is that family: its experiment's settings stay)."""
    from mlops_ray.config import validate
    from mlops_ray.config.compose import group_option
    spec = group_option("model", name, field="candidates")
    own = job.model.spec()
    same = (spec.get("_target_"), spec.get("library")) == (own.get("_target_"),
                                                             own.get("library"))
    return job if same else validate({**job.plain(), "model": spec}, type(job))


def stage_names(job: Any) -> list[str]:
    first = ("tune" if job.tune.enabled else "train")
    names = [f"{s}[{c}]" for c in job.candidates for s in (first, "evaluate")]
    return names + [s for s in job.stages if s not in ("train", "evaluate")]


def race(ctx: Context) -> tuple[Context, list[dict[str, Any]]]:
    """Train and judge every candidate; returns the winner's context and the table."""
    from mlops_ray.artifacts.runs import resolve_run
    from mlops_ray.pipeline import stages
    jobs = {c: candidate_job(ctx.job, c) for c in ctx.job.candidates}  # all checked first
    table, contexts = [], {}
    for name, job in jobs.items():
        c = replace(ctx, job=job, tag=f"[{name}]", report=None)
        run_uri = stages.train(c)
        c.rec, c.run_store = resolve_run(run_uri, job.storage.plain())
        c.prod = ctx.reg.alias_target(ctx.model, "production")
        c.already = c.prod is not None and c.prod.run_uri == c.rec["run_uri"]
        row: dict[str, Any] = {"candidate": name, "run": c.rec["run_uri"]}
        try:
            if "evaluate" in job.stages:
                stages.evaluate(c)
            row["passed"] = True
        except GateFailed as e:
            row.update(passed=False, failed=e.failed)
        rep = c.report or {}
        metrics = {g["metric"]: g["value"] for g in rep.get("gates", [])}
        row.update(report=rep.get("report_uri"), model_card=rep.get("model_card"),
                   **{k: _metric(rep, metrics, k) for k in (SELECT_BY, "test/auc")},
                   production=c.already)
        table.append(row)
        contexts[name] = c
    ok = [r for r in table if r["passed"]]
    if not ok:
        failed = [f"{r['candidate']}: {', '.join(r.get('failed') or [])}" for r in table]
        raise GateFailed(failed, "no candidate passed its gates; production is unchanged")
    win = max(ok, key=lambda r: (r["production"], r[SELECT_BY] or float("-inf")))
    for r in table:
        r["selected"] = r is win
    w = contexts[win["candidate"]]
    ctx.log(race_table(table))
    return replace(w, tag=""), table


def _metric(rep: dict[str, Any], gated: dict[str, Any], key: str) -> float | None:
    """A number of the candidate's report: from its gates, else its CV summary / test."""
    if key in gated:
        return gated[key]
    cv = ((rep.get("cv") or {}).get("summary") or {})
    test = ((rep.get("test") or {}).get("metrics") or {})
    v = cv.get(key, test.get(key))
    return float(v) if v is not None else None


def _f(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "-"


def race_table(table: list[dict[str, Any]]) -> str:
    lines = [f"{'candidate':<12} {'gates':<7} {SELECT_BY:>12} {'test/auc':>9}  run"]
    for r in table:
        lines.append(f"{r['candidate']:<12} {'pass' if r['passed'] else 'FAIL':<7} "
                     f"{_f(r[SELECT_BY]):>12} {_f(r['test/auc']):>9}  {r['run']}"
                     + ("  <- selected" if r.get("selected") else "")
                     + (f"  (failed: {', '.join(r['failed'])})" if r.get("failed") else ""))
    return "\n".join(lines)
