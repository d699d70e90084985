"""`jobs.pipeline`: a model's whole way to production in one command.

    train (or tune) -> evaluate -> promote -> deploy (canary on Serve) -> smoke -> summary

Every stage's output has a URI (run folder, gate report, registry version, Serve app), and a
stage is skipped when its output exists for the same inputs, so a pipeline killed anywhere
resumes at the stage it was in: training also resumes from its last checkpoint, evaluation
reuses its finished folds. A failed gate stops the pipeline before promotion (exit 5), audited.
The dataset is loaded, validated and prepared once, before Ray starts, for every stage.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlops_ray.config.pipeline import PipelineJob
from mlops_ray.errors import ConfigError
from mlops_ray.pipeline.context import Context, stage_table

STAGES = ("train", "evaluate", "promote", "deploy", "smoke")


def run_pipeline(job: PipelineJob, log: Callable[[str], Any] = print,
                 prepared: Any = None) -> dict[str, Any]:
    """Run the configured stages (`prepared`: the job's data, when the caller has validated it
    already). Returns the pipeline record (also written next to the run as pipeline.json).
    Raises GateFailed (exit 5) when the gates refuse the candidate, ServeError / SmokeFailed
    (exit 10) when serving it fails."""
    from mlops_ray.artifacts.runs import resolve_run
    from mlops_ray.data import prepare
    from mlops_ray.pipeline import stages
    from mlops_ray.pipeline.race import candidate_job, race, stage_names
    from mlops_ray.registry import open_registry
    from mlops_ray.storage import resolve
    names = stage_names(job) if job.candidates else [
        ("tune" if s == "train" and job.tune.enabled else s) for s in job.stages]
    for c in job.candidates:  # every candidate's model checked before any work
        candidate_job(job, c)
    reg = open_registry(job)  # a bad database URL fails before any work
    # data validated before Ray starts; every stage reuses it
    prepared = prepared or prepare(job.dataset, job.seed, storage=job.storage)
    ctx = Context(job, prepared, reg, log, names)
    out: dict[str, Any] = {"model": ctx.model, "stages": ctx.done, "run": job.run,
                           "data_version": prepared.version, "trigger": job.trigger}
    try:
        if job.candidates:  # train and judge each; the winner's context goes on
            ctx, out["candidates"] = race(ctx)
            out["run"], out["report"] = ctx.rec["run_uri"], ctx.report
        else:
            run_uri = job.run
            if "train" in job.stages:
                run_uri = (stages.tune if job.tune.enabled else stages.train)(ctx)
            if run_uri is None:
                raise ConfigError("run: stages without train need run=<run folder or tuning "
                                  "folder>")
            ctx.rec, ctx.run_store = resolve_run(run_uri, job.storage.plain())
            out["run"] = ctx.rec["run_uri"]
            ctx.prod = reg.alias_target(ctx.model, "production")
            ctx.already = ctx.prod is not None and ctx.prod.run_uri == ctx.rec["run_uri"]
            if "evaluate" in job.stages:
                out["report"] = stages.evaluate(ctx)
        if "promote" in job.stages:
            out["version"] = stages.promote(ctx)
        if "deploy" in job.stages:
            out["serving"] = stages.deploy(ctx)
        if "smoke" in job.stages:
            out["smoke"] = stages.smoke(ctx)
    except BaseException:
        log(stage_table(ctx.done))  # where it stopped; the error follows
        raise
    finally:
        stages.drop_folds_ahead(ctx)  # started beside training, not taken over by evaluate
        stages.drop_early_serve(ctx)  # no deploy took it: remove Serve started early
        if out["run"]:
            try:
                resolve(out["run"], job.storage.endpoint_url, job.storage.region).write_json(
                    {k: v for k, v in out.items() if k != "report"}, "pipeline.json")
            except Exception as e:  # noqa: BLE001 - never hide the stage's own error
                log(f"warning: pipeline record not written: {e}")
    return out


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = [stage_table(out["stages"]), ""]
    if out.get("candidates"):
        from mlops_ray.pipeline.race import race_table
        lines += [race_table(out["candidates"]), ""]
    rep = out.get("report") or {}
    if rep.get("model_card"):
        lines.append(f"model card {rep['model_card']}")
    if out.get("version") is not None:
        lines.append(f"registry   {out['model']}:{out['version']}  (python -m jobs.registry "
                     f"history {out['model']})")
    if srv := out.get("serving"):
        lines.append(f"endpoint   {srv['endpoint']}/predict  {srv['endpoint']}/v2/models/"
                     f"{out['model']}/infer  ({srv['version']})")
        lines.append(f"dashboard  {srv['dashboard'] or '(the cluster dashboard)'}")
        lines.append(f"ray        {srv['ray_address']}  (other jobs join it with ray.address="
                     f"{srv['ray_address']}, e.g. jobs.monitor, jobs.serve action=status)")
    if out.get("run"):
        lines.append(f"run        {out['run']}  (pipeline.json)")
    return lines
