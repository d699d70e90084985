"""Batch scoring: `jobs.predict` (Ray Data, its own local Ray) against the same rows scored in one
plain process by the Predictor that Serve replicas and the scoring actors use, in one run.

    python bench/batch_predict.py                 # Adult x20 (976,840 rows), job's defaults
    python bench/batch_predict.py --replicas 50 --concurrency 2 --batch-size 8192 --json

The registry version is the default experiment's network (MLP 256-256 on Adult's 108 inputs,
weights at their seed-0 initialisation: throughput does not depend on them), registered without
Ray. Adult is written `--replicas` times into one Parquet file, a row group per copy.
  (a)  one process, no Ray: pyarrow batches of `--batch-size` rows streamed from the row groups,
       `Predictor.predict_proba` on each (one torch thread, as in a scoring actor)
  (a+) the same loop also doing what each scoring actor does besides predicting: the drift
       counts of the batch (`mlops_ray.predict.drift.batch_counts`)
  (b)  `python -m jobs.predict ...` as a subprocess: the whole process (imports, registry,
       input check, Ray start, scoring, Parquet output, drift report, commit, Ray shutdown)
  (b') the same run, its Ray Data execution alone (read -> score -> write, as Ray Data logs it)
  (c)  the same job on one batch of rows: what a run costs whatever its size; (b')-(c') is
       the steady state once the scoring actors are up
Ratios are rows/s over (a)'s. Both must produce the same probabilities for every row (max |diff|
<= 1e-6, every row once, else exit 1): the job's output is read back and lined up by
source_row. Peak RSS is per process: the baseline's, and the largest scoring actor's as the job
reports it (object-store pages it touched included). Example output (2-core dev machine):

    rows 976,840 (Adult x20, 20 row groups); job: predict.batch_size=4096 predict.concurrency=2
    variant                                       rows      s    rows/s  ratio  peak RSS
    (a)  Predictor, one process, no Ray        976,840    5.2   187,897   1.00   529 MiB
    (a+) (a) + drift counts per batch          976,840    6.5   151,183   0.80   529 MiB
    (b)  jobs.predict, whole process           976,840   19.6    49,830   0.27   698 MiB
    (b') jobs.predict, Ray Data execution      976,840    9.5   103,260   0.55   698 MiB
    (b'-c') (b') minus a one-batch run         972,744    4.3   227,277   1.21         -
    jobs.predict's own wall time (from run(), Ray start included): 13.71 s
    fixed cost (c), 4,096 rows: 15.1 s whole process, 5.2 s Ray Data execution
    probabilities: 976,840 rows, max |diff| 5.96e-08 (b vs a)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=20, help="copies of Adult (48,842 rows)")
    ap.add_argument("--concurrency", default=None,
                    help="predict.concurrency for the job: N or MIN,MAX (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per batch, job (predict.batch_size) and baseline alike "
                         "(default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides for the job (repeatable), e.g. "
                         "ray.include_dashboard=false")
    ap.add_argument("--no-fixed-cost", action="store_true",
                    help="skip the one-batch job run (c) and the steady-state row (b'-c')")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead")
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
    cfg = compose("predict", [])["predict"]
    batch = a.batch_size or int(cfg["batch_size"])
    conc = a.concurrency or cfg["concurrency"]
    conc = ",".join(map(str, conc)) if isinstance(conc, list) else str(conc)
    overrides = [f"predict.batch_size={batch}",
                 f"predict.concurrency={f'[{conc}]' if ',' in conc else conc}", *a.set]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        work = Path(d)
        folder = make_registry(work)
        data = work / "input" / f"adult_x{a.replicas}.parquet"
        data.parent.mkdir()
        rows = write_input(data, a.replicas)
        groups = pq.ParquetFile(data).metadata.num_row_groups

        # (a) in a child process of its own, so its peak RSS is the scoring loop's alone
        npy = work / "baseline.npy"
        _, out, _ = run_child([sys.executable, __file__, "--baseline-only", folder, str(data),
                               str(batch), str(npy)], env, work / "baseline")
        base = json.loads(out.strip().splitlines()[-1])
        # (b), then (c): the same job on one batch of rows, what it costs whatever the size
        b_wall, b_exec, manifest = run_job(data, work / "scored", work, overrides, env)
        want = np.load(npy)
        got_rows, got = job_probabilities(work / "scored")
        if not a.no_fixed_cost:
            small = work / "small" / "one_batch.parquet"
            small.parent.mkdir()
            first = next(pq.ParquetFile(data).iter_batches(batch_size=batch))
            pq.write_table(pa.Table.from_batches([first]), small)
            c_wall, c_exec, c_manifest = run_job(small, work / "scored-small", work, overrides,
                                                 env)
    complete = manifest["rows_scored"] == rows == len(want) == len(got) and bool(
        (got_rows == np.arange(rows)).all())
    diff = float(np.abs(got - want).max()) if complete and rows else float("nan")
    actor_rss = max((w["peak_rss"] for w in manifest["workers"]), default=None)

    res = [("(a)  Predictor, one process, no Ray", base["rows"], base["predict_s"],
            base["peak_rss"]),
           ("(a+) (a) + drift counts per batch", base["rows"], base["with_drift_s"],
            base["peak_rss"]),
           ("(b)  jobs.predict, whole process", rows, b_wall, actor_rss)]
    if b_exec is not None:
        res.append(("(b') jobs.predict, Ray Data execution", rows, b_exec, actor_rss))
    fixed = None
    if not a.no_fixed_cost:
        n = c_manifest["rows_scored"]
        fixed = {"rows": n, "wall_s": c_wall, "execution_s": c_exec}
        if b_exec is not None and c_exec is not None:  # process walls vary with Ray's start
            res.append(("(b'-c') (b') minus a one-batch run", rows - n, b_exec - c_exec, None))
    base_rate = base["rows"] / base["predict_s"]
    results = [{"variant": v, "rows": r, "s": t, "rows_per_s": r / t if t > 0 else None,
                "ratio": r / t / base_rate if t > 0 else None, "peak_rss": m}
               for v, r, t, m in res]
    ok = complete and diff <= TOLERANCE
    check = (f"probabilities: {len(got):,} rows, max |diff| {diff:.3g} (b vs a)" if complete else
             f"probabilities: job wrote {len(got):,} rows ({manifest['rows_scored']:,} reported), "
             f"baseline {len(want):,}, input {rows:,}: not the same rows")
    if a.json:
        print(json.dumps({"rows": rows, "replicas": a.replicas, "row_groups": groups,
                          "batch_size": batch, "overrides": overrides, "results": results,
                          "fixed_cost": fixed, "job_own_wall_s": manifest["wall_s"],
                          "max_abs_diff": diff if complete else None, "ok": ok}, indent=1))
    else:
        mib = 1 << 20
        print(f"rows {rows:,} (Adult x{a.replicas}, {groups} row groups); job: "
              f"{' '.join(overrides)}")
        print(f"{'variant':<40} {'rows':>9} {'s':>6} {'rows/s':>9} {'ratio':>6} {'peak RSS':>9}")
        for r in results:
            rss = f"{r['peak_rss'] / mib:.0f} MiB" if r["peak_rss"] else "-"
            rate = f"{r['rows_per_s']:>9,.0f} {r['ratio']:>6.2f}" if r["rows_per_s"] else \
                f"{'-':>9} {'-':>6}"
            print(f"{r['variant']:<40} {r['rows']:>9,} {r['s']:>6.1f} {rate} {rss:>9}")
        print(f"jobs.predict's own wall time (from run(), Ray start included): "
              f"{manifest['wall_s']} s")
        if fixed:
            ex = f"{fixed['execution_s']:.1f}" if fixed["execution_s"] is not None else "?"
            print(f"fixed cost (c), {fixed['rows']:,} rows: {fixed['wall_s']:.1f} s whole "
                  f"process, {ex} s Ray Data execution")
        print(check)
    if not ok:
        sys.exit(f"FAILED: {check} (allowed: max |diff| <= {TOLERANCE}, every row once)")


if __name__ == "__main__":
    main()
