"""Batch scoring: `jobs.predict` (Ray Data) against the same rows scored in one plain process by
the Predictor that Serve replicas and the scoring actors use; medians of `--runs` runs.

    python bench/batch_predict.py                 # Adult x20 (976,840 rows), job's defaults
    python bench/batch_predict.py --arms warm --runs 5 --json out.json

The registry version is the default experiment's network (MLP 256-256 on Adult's 108 inputs,
weights at their seed-0 initialisation: throughput does not depend on them), registered without
Ray. Adult is written `--replicas` times into one Parquet file, a row group per copy.
  (a)  one process, no Ray: pyarrow batches of `--batch-size` rows streamed from the row groups,
       `Predictor.predict_proba` on each (one torch thread, as in a scoring actor)
  (a+) the same loop also doing what each scoring actor does besides predicting: the drift
       counts of the batch (`mlops_ray.predict.drift.batch_counts`)
  (b)  `python -m jobs.predict ...` as a subprocess: the whole process (imports, registry,
       input check, Ray start or attach, scoring, Parquet output, drift report, commit)
  (b') the same run, its Ray Data execution alone (read -> score -> write, as Ray Data logs it)
  (c)  the same job on one batch of rows, once: what a run costs whatever its size; (b')-(c')
       is the steady state once the scoring actors are up
Arms of the job (`--arms`): `local` runs it with `ray.address=local` (a throwaway Ray inside the
job); `warm` on the warm local Ray of a temporary MLOPS_RAY_WARM_DIR: the first job starts it
(reported alone, "cold"), the next `--runs` attach back to back; `pool`: on the same cluster,
each job started once its pool of idle workers (mlops_ray/pool.py) is full again (the wait is
not counted); the cluster is stopped at the end.
Every figure is the median of `--runs` runs (each in its own process), with the spread
(min-max); ratios are rows/s over (a)'s median. Every job run must produce the same
probabilities as (a) for every row (max |diff| <= 1e-6, every row once, else exit 1): its
output is read back and lined up by source_row. Peak RSS is per process: the baseline's, and
the largest scoring actor's as the job reports it (object-store pages it touched included).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "adult_mlp"
ROW_GROUP = 50_000
TOLERANCE = 1e-6


def make_registry(work: Path) -> str:
    """A registry under `work` (as jobs.predict finds it with storage.uri=work) holding one
    version of the default network, alias production; returns the version's folder."""
    import torch

    from mlops_ray.config.compose import compose
    from mlops_ray.config.train import DatasetCfg
    from mlops_ray.data import prepare
    from mlops_ray.data.profile import profile
    from mlops_ray.pipeline.promote import signature
    from mlops_ray.registry import Policy, Registry
    from mlops_ray.storage import resolve
    from mlops_ray.utils import build
    cfg = compose("train", ["+experiment=adult_mlp"])
    p = prepare(DatasetCfg.model_validate(cfg["dataset"]), cfg["seed"])
    torch.manual_seed(0)
    model = build(cfg["model"], in_features=p.preprocessor.n_features)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    pre = p.preprocessor
    ds = {"label": p.label, "positive": p.positive, "sensitive": p.sensitive}
    rows = p.frame.iloc[p.splits["train"]]
    files = {"model.pt": buf.getvalue(),
             "meta.json": json.dumps({"model": cfg["model"],
                                      "in_features": pre.n_features}).encode(),
             "preprocessor.json": json.dumps(pre.to_dict()).encode(),
             "signature.json": json.dumps(signature(pre, ds, 0.5, False)).encode(),
             "reference.json": json.dumps(profile(rows, pre.numeric, pre.categorical)).encode()}
    reg = Registry(f"sqlite:///{work / 'mlops_ray.db'}", resolve(str(work)), Policy.default())
    # the verdict a registry accepts: a passed gate report signed with its key
    from mlops_ray.registry.signing import sign
    files["gate_report.json"] = json.dumps(sign({"passed": True, "champion": None, "lineage": {
        "run": "bench", "data_version": None, "config_hash": None}}, reg.key)).encode()
    v = reg.register(MODEL, files, {"run_uri": "bench"})
    reg.set_alias(MODEL, "production", v.version, expected=None)
    return v.artifact_uri.removeprefix("file://")


def write_input(path: Path, replicas: int) -> int:
    """Adult `replicas` times into one Parquet file, written a copy at a time (never whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops_ray.data import load_table
    table = pa.Table.from_pandas(load_table("builtin://adult"), preserve_index=False)
    with pq.ParquetWriter(path, table.schema) as w:
        for _ in range(replicas):
            w.write_table(table, row_group_size=ROW_GROUP)
    return replicas * table.num_rows


def baseline(folder: str, data: str, batch: int, probs_out: str) -> dict:
    """(a) and (a+) in this process: streaming batches, bounded memory. Writes (a)'s
    probabilities to `probs_out` (.npy) for the comparison with the job's output."""
    import numpy as np
    import pyarrow.parquet as pq

    from mlops_ray.artifacts.predictor import Predictor
    from mlops_ray.predict.drift import batch_counts, drift_columns
    pred = Predictor.load(folder, f"{MODEL}:1")  # sets one torch thread, as in an actor
    pf = pq.ParquetFile(data)
    names = set(pf.schema_arrow.names)
    features = [i["name"] for i in pred.signature["inputs"] if i["name"] in names]
    drift_num, drift_cat = drift_columns(pred.reference, names)
    features += [c for c in [*drift_num, *drift_cat] if c not in features]
    out: list[np.ndarray] = []
    predict_s = drift_s = 0.0
    t0 = time.perf_counter()
    for b in pf.iter_batches(batch_size=batch, columns=features):
        t = time.perf_counter()
        df = b.to_pandas()
        out.append(pred.predict_proba(df))
        t2 = time.perf_counter()
        batch_counts(df, pred.reference, drift_num, drift_cat)
        predict_s += t2 - t
        drift_s += time.perf_counter() - t2
    wall = time.perf_counter() - t0
    p = np.concatenate(out)
    np.save(probs_out, p)
    # reading a batch happens between the timers: charged to (a) and (a+) alike
    read_s = wall - predict_s - drift_s
    return {"rows": int(len(p)), "predict_s": read_s + predict_s, "with_drift_s": wall,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[float, str, str]:
    """Run `cmd`, stdout and stderr to files; (wall s, stdout, stderr); exits on failure."""
    t = time.perf_counter()
    with open(log.with_suffix(".out"), "w") as o, open(log.with_suffix(".err"), "w") as e:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=o, stderr=e).returncode
    wall = time.perf_counter() - t
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}):\n{out[-2000:]}\n{err[-3000:]}")
    return wall, out, err


def execution_s(text: str) -> float | None:
    """Ray Data's own timing of the pipeline, from its log line (None if it did not print)."""
    m = re.findall(r"execution finished in ([0-9.]+) seconds", text)
    return float(m[-1]) if m else None


def job_probabilities(out: Path):
    import pyarrow.parquet as pq
    t = pq.read_table(out / "predictions", columns=["source_row", "probability"])
    order = t.column("source_row").to_numpy().argsort(kind="stable")
    return t.column("source_row").to_numpy()[order], t.column("probability").to_numpy()[order]


def run_job(data: Path, out: Path, work: Path, overrides: list[str], env: dict
            ) -> tuple[float, float | None, dict]:
    """`python -m jobs.predict` on `data` -> (process wall s, Ray Data execution s, manifest)."""
    wall, stdout, stderr = run_child(
        [sys.executable, "-m", "jobs.predict", f"ref={MODEL}@production", f"input={data}",
         f"output={out}", f"storage.uri={work}", *overrides], env, work / f"job-{out.name}")
    return wall, execution_s(stdout + stderr), json.loads((out / "_SUCCESS").read_text())


def med(vals: list[float]) -> tuple[float, float, float]:
    return statistics.median(vals), min(vals), max(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=20, help="copies of Adult (48,842 rows)")
    ap.add_argument("--runs", type=int, default=3, help="runs per arm (medians and spreads)")
    ap.add_argument("--arms", default="local,warm,pool", help="job arms, of local,warm,pool")
    ap.add_argument("--concurrency", default=None,
                    help="predict.concurrency for the job: N or MIN,MAX (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per batch, job (predict.batch_size) and baseline alike "
                         "(default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides for the job (repeatable), e.g. "
                         "ray.include_dashboard=false")
    ap.add_argument("--no-fixed-cost", action="store_true",
                    help="skip the one-batch job runs (c) and the steady-state rows (b'-c')")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help="print the results as JSON instead (or write them to FILE as well)")
    ap.add_argument("--baseline-only", nargs=4, metavar=("FOLDER", "DATA", "BATCH", "NPY"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.baseline_only:
        folder, data, batch, npy = a.baseline_only
        print(json.dumps(baseline(folder, data, int(batch), npy)))
        return

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops_ray.config.compose import compose
    # the job's defaults (the required keys given placeholders: only `predict` is read here)
    cfg = compose("predict", [f"ref={MODEL}", "input=-", "output=-"])["predict"]
    batch = a.batch_size or int(cfg["batch_size"])
    conc = a.concurrency or cfg["concurrency"]
    conc = ",".join(map(str, conc)) if isinstance(conc, list) else str(conc)
    overrides = [f"predict.batch_size={batch}",
                 f"predict.concurrency={f'[{conc}]' if ',' in conc else conc}", *a.set]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RAY_ADDRESS", "MLOPS_RAY_WARM_DIR"):
        env.pop(k, None)
    arms = a.arms.split(",") if a.arms else []
    jobs: dict[str, list[dict]] = {}  # arm -> runs {wall_s, exec_s, manifest, diff, complete}
    fixed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        work = Path(d)
        folder = make_registry(work)
        data = work / "input" / f"adult_x{a.replicas}.parquet"
        data.parent.mkdir()
        rows = write_input(data, a.replicas)
        groups = pq.ParquetFile(data).metadata.num_row_groups
        small = work / "small" / "one_batch.parquet"
        small.parent.mkdir()
        first = next(pq.ParquetFile(data).iter_batches(batch_size=batch))
        pq.write_table(pa.Table.from_batches([first]), small)

        # (a) each in a child process of its own, so its peak RSS is the scoring loop's alone
        npy = work / "baseline.npy"
        bases = []
        for _ in range(a.runs):
            _, out, _ = run_child([sys.executable, __file__, "--baseline-only", folder,
                                   str(data), str(batch), str(npy)], env, work / "baseline")
            bases.append(json.loads(out.strip().splitlines()[-1]))
        want = np.load(npy)
        n_run = 0

        def one(arm_env: dict, extra: list[str], src: Path = data) -> dict:
            nonlocal n_run
            n_run += 1
            out = work / f"scored-{n_run}"
            wall, ex, manifest = run_job(src, out, work, [*overrides, *extra], arm_env)
            r = {"wall_s": wall, "exec_s": ex, "manifest": manifest}
            if src == data:
                got_rows, got = job_probabilities(out)
                r["complete"] = manifest["rows_scored"] == rows == len(want) == len(got) and \
                    bool((got_rows == np.arange(rows)).all())
                r["diff"] = float(np.abs(got - want).max()) if r["complete"] else float("nan")
            shutil.rmtree(out, ignore_errors=True)
            return r

        if "local" in arms:
            jobs["local"] = [one(env, ["ray.address=local"]) for _ in range(a.runs)]
            if not a.no_fixed_cost:
                fixed["local"] = one(env, ["ray.address=local"], small)
        if "warm" in arms or "pool" in arms:
            from mlops_ray import pool, warm
            wdir = Path(tempfile.mkdtemp(prefix="bench-warm-"))
            wenv = {**env, "MLOPS_RAY_WARM_DIR": str(wdir)}

            def refilled(arm_env: dict, extra: list[str], src: Path = data) -> dict:
                pool.wait_full(warm.read_state(wdir)["temp_dir"])
                return one(arm_env, extra, src)
            try:
                jobs["warm cold"] = [one(wenv, [])]
                for arm, run in (("warm", one), ("pool", refilled)):
                    if arm in arms:
                        jobs[arm] = [run(wenv, []) for _ in range(a.runs)]
                        if not a.no_fixed_cost:
                            fixed[arm] = run(wenv, [], small)
            finally:
                warm.stop(wdir, quiet=True)
                shutil.rmtree(wdir, ignore_errors=True)
    report(a, rows, groups, overrides, bases, jobs, fixed)


def report(a: argparse.Namespace, rows: int, groups: int, overrides: list[str],
           bases: list[dict], jobs: dict[str, list[dict]], fixed: dict[str, dict]) -> None:
    names = {"local": "jobs.predict ray.address=local (own Ray)",
             "warm cold": "jobs.predict, warm cluster, 1st run (starts it)",
             "warm": "jobs.predict, warm cluster, attached",
             "pool": "jobs.predict, warm cluster, pool refilled"}
    base_rows = bases[0]["rows"]
    base_rate = base_rows / med([b["predict_s"] for b in bases])[0]
    table = [("(a)  Predictor, one process, no Ray", base_rows,
              med([b["predict_s"] for b in bases]), max(b["peak_rss"] for b in bases)),
             ("(a+) (a) + drift counts per batch", base_rows,
              med([b["with_drift_s"] for b in bases]), max(b["peak_rss"] for b in bases))]
    for arm, runs in jobs.items():
        rss = max((w["peak_rss"] for r in runs for w in r["manifest"]["workers"]), default=None)
        table.append((f"(b)  {names[arm]}, whole process", rows,
                      med([r["wall_s"] for r in runs]), rss))
        ex = [r["exec_s"] for r in runs if r["exec_s"] is not None]
        if ex:
            table.append(("(b')   its Ray Data execution", rows, med(ex), None))
        f = fixed.get(arm)
        if ex and f and f["exec_s"] is not None:
            n = f["manifest"]["rows_scored"]
            table.append((f"(b'-c') minus a {n:,}-row run", rows - n,
                          tuple(x - f["exec_s"] for x in med(ex)), None))
    results = [{"variant": v, "rows": r, "s": s[0], "s_min": s[1], "s_max": s[2],
                "rows_per_s": r / s[0] if s[0] > 0 else None,
                "ratio": r / s[0] / base_rate if s[0] > 0 else None, "peak_rss": m}
               for v, r, s, m in table]
    every = [r for runs in jobs.values() for r in runs]
    ok = all(r["complete"] and r["diff"] <= TOLERANCE for r in every)
    diff = max((r["diff"] for r in every), default=float("nan"))
    check = (f"probabilities: {len(every)} job runs x {rows:,} rows, max |diff| {diff:.3g} "
             f"(b vs a)" if all(r["complete"] for r in every) else
             "probabilities: a job run did not write every input row once")
    fixed_out = {arm: {"rows": f["manifest"]["rows_scored"], "wall_s": f["wall_s"],
                       "execution_s": f["exec_s"]} for arm, f in fixed.items()}
    own = {arm: med([r["manifest"]["wall_s"] for r in runs]) for arm, runs in jobs.items()}
    if a.json:
        doc = {"rows": rows, "replicas": a.replicas, "row_groups": groups, "runs": a.runs,
               "overrides": overrides, "results": results, "fixed_cost": fixed_out,
               "job_own_wall_s": own, "max_abs_diff": diff, "ok": ok}
        if a.json == "-":
            print(json.dumps(doc, indent=1))
        else:
            Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.json != "-":
        mib = 1 << 20
        print(f"rows {rows:,} (Adult x{a.replicas}, {groups} row groups); job: "
              f"{' '.join(overrides)}; median (min-max) of {a.runs} runs")
        print(f"{'variant':<66} {'rows':>9} {'s':>15} {'rows/s':>9} {'ratio':>5} "
              f"{'peak RSS':>9}")
        for r in results:
            rss = f"{r['peak_rss'] / mib:.0f} MiB" if r["peak_rss"] else "-"
            rate = f"{r['rows_per_s']:>9,.0f} {r['ratio']:>5.2f}" if r["rows_per_s"] else \
                f"{'-':>9} {'-':>5}"
            span = f"{r['s']:.1f} ({r['s_min']:.1f}-{r['s_max']:.1f})"
            print(f"{r['variant']:<66} {r['rows']:>9,} {span:>15} {rate} {rss:>9}")
        for arm, o in own.items():
            print(f"{names[arm]}: the job's own wall time (from run()): {o[0]:.2f} s "
                  f"({o[1]:.2f}-{o[2]:.2f})")
        for arm, f in fixed_out.items():
            ex = f"{f['execution_s']:.1f}" if f["execution_s"] is not None else "?"
            print(f"fixed cost (c), {names[arm]}, {f['rows']:,} rows: {f['wall_s']:.1f} s whole "
                  f"process, {ex} s Ray Data execution")
        print(check)
    if not ok:
        sys.exit(f"FAILED: {check} (allowed: max |diff| <= {TOLERANCE}, every row once)")


if __name__ == "__main__":
    main()
