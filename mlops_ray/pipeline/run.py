"""`jobs.pipeline`: a model's whole way to production in one command.

    train (or tune) -> evaluate -> promote -> deploy (canary on Serve) -> smoke -> summary

Every stage's output has a URI (run folder, gate report, registry version, Serve app), and a
stage is skipped when its output exists for the same inputs, so a pipeline killed anywhere
resumes at the stage it was in: training also resumes from its last checkpoint, evaluation
reuses its finished folds. A failed gate stops the pipeline before promotion (exit 5), audited.
The dataset is loaded, validated and prepared once, before Ray starts, for every stage.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlops_ray.config.pipeline import PipelineJob
from mlops_ray.errors import ConfigError

STAGES = ("train", "evaluate", "promote", "deploy", "smoke")


@dataclass
class Context:
    """What the stages share: the job, its data (prepared once), the registry, the log, and
    what earlier stages found (the run, production as it was before this pipeline)."""
    job: PipelineJob
    prepared: Any
    reg: Any
    log: Callable[[str], Any]
    names: list[str]
    done: list[dict[str, Any]] = field(default_factory=list)
    rec: dict[str, Any] = field(default_factory=dict)  # the candidate's run record
    run_store: Any = None
    prod: Any = None  # production's version before this pipeline
    already: bool = False  # production already is this run

    @property
    def model(self) -> str:
        return self.job.model_name

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a stage: print its header, time it, record done / skipped / failed."""
        n = self.names.index(name) + 1 if name in self.names else len(self.done) + 1
        self.log(f"== [{n}/{len(self.names)}] {name}")
        entry: dict[str, Any] = {"stage": name, "status": "done", "output": None, "note": ""}
        self.done.append(entry)
        t0 = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            entry["status"] = "failed"
            entry["note"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            if entry["status"] == "skipped":
                self.log(f"   skipped: {entry['note']}")


def stage_table(done: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<9} {'status':<8} {'s':>7}  output"]
    for e in done:
        lines.append(f"{e['stage']:<9} {e['status']:<8} {e.get('seconds', 0):>7.1f}  "
                     f"{e['output'] or ''}{'  (' + e['note'] + ')' if e['note'] else ''}")
    return "\n".join(lines)


def run_pipeline(job: PipelineJob, log: Callable[[str], Any] = print,
                 prepared: Any = None) -> dict[str, Any]:
    """Run the configured stages (`prepared`: the job's data, when the caller has validated it
    already). Returns the pipeline record (also written next to the run as pipeline.json).
    Raises GateFailed (exit 5) when the gates refuse the candidate, ServeError / SmokeFailed
    (exit 10) when serving it fails."""
    from mlops_ray.artifacts.runs import resolve_run
    from mlops_ray.data import prepare
    from mlops_ray.pipeline import stages
    from mlops_ray.registry import open_registry
    from mlops_ray.storage import resolve
    names = [("tune" if s == "train" and job.tune.enabled else s) for s in job.stages]
    reg = open_registry(job)  # a bad database URL fails before any work
    # data validated before Ray starts; every stage reuses it
    prepared = prepared or prepare(job.dataset, job.seed, storage=job.storage)
    ctx = Context(job, prepared, reg, log, names)
    out: dict[str, Any] = {"model": ctx.model, "stages": ctx.done, "run": job.run,
                           "data_version": prepared.version, "trigger": job.trigger}
    try:
        run_uri = job.run
        if "train" in job.stages:
            run_uri = (stages.tune if job.tune.enabled else stages.train)(ctx)
        if run_uri is None:
            raise ConfigError("run: stages without train need run=<run folder or tuning folder>")
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
        if out["run"]:
            try:
                resolve(out["run"], job.storage.endpoint_url, job.storage.region).write_json(
                    {k: v for k, v in out.items() if k != "report"}, "pipeline.json")
            except Exception as e:  # noqa: BLE001 - never hide the stage's own error
                log(f"warning: pipeline record not written: {e}")
    return out


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = [stage_table(out["stages"]), ""]
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
