"""Feature store (#19): what the online lookup adds to a served request, in one run.

    flock /tmp/ray-test.lock python bench/feature_serving.py --json /tmp/feature_serving.json
    flock /tmp/ray-test.lock python bench/feature_serving.py --requests 1000 --rounds 1

Goal: "Online lookup adds <= 2 ms p50 per request at concurrency 16."

One throwaway local Ray in this process (2 CPUs, 127.0.0.1, direct ingress on) runs
`jobs.pipeline` twice, in-process (`run_pipeline`, the CI profile: 2 epochs), on the same Serve
instance and HTTP port, as two Serve apps with their own route prefix:
  entity  `+experiment=adult_people_mlp` (Feast dataset): app `fs-entity`, prefix /entity; a
          request is {"records": [{"person_id": k}]} and the ingress reads the online store
          (SQLite, materialized by the deploy stage)
  flat    `+experiment=adult_mlp` (the flat table, same model family): app `fs-flat`, prefix
          /flat; a request carries the full feature record
Both apps run with the defaults of conf/serve/default.yaml except the response cache, which is
off (`serve.cache.enabled=false`, see --cache): every request runs the model. Requests go to
each app's direct-ingress URL (the replica's own port) when both have one, else to Serve's proxy.

Bodies: --pool person_ids sampled (seed 0) from the shipped entity frame; the flat arm sends, for
the same people, the very feature values the online store holds for them (read once here with
the ingress's own `OnlineLookup`), so both arms run the model on identical rows and differ only
in where the features come from. One record per request.

Load: a closed loop of --concurrency requests in flight (asyncio + aiohttp, one connection pool,
on the same machine), --requests per arm per round after --warmup untimed requests to that arm.
--rounds rounds, the arms' order alternating (entity flat, flat entity, ...). Per arm: p50, p90,
p99 per request and req/s, median (min-max) over rounds; the added p50 (entity - flat, per
round, from the same round) median (min-max), and the ratio of the p50s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ARMS = ("entity", "flat")
GOAL_MS = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(experiment: str, app: str, storage: Path, gcs: str, port: int, cache: bool,
             logfile: Path) -> dict[str, Any]:
    from mlops_ray.config.compose import job
    from mlops_ray.config.pipeline import PipelineJob
    from mlops_ray.pipeline.run import run_pipeline
    pj = job("pipeline", PipelineJob, [
        f"+experiment={experiment}", "+profile=ci", f"storage.uri={storage}",
        f"ray.address={gcs}", f"serve.port={port}", f"serve.app_name={app}",
        f"serve.route_prefix=/{app.removeprefix('fs-')}",
        f"serve.cache.enabled={'true' if cache else 'false'}"])
    t0 = time.perf_counter()
    with logfile.open("a") as f:
        out = run_pipeline(pj, log=lambda m: print(m, file=f, flush=True))
    s = out["serving"]
    print(f"  {experiment}: trained, gated, served as '{app}' in {time.perf_counter() - t0:.0f} s"
          f" ({s['version']}; proxy {s['endpoint']}, direct {s['direct_endpoint']})",
          file=sys.stderr)
    return {"job": pj, "out": out}


def bodies(people: dict, flat: dict, pool: int, seed: int) -> dict[str, list[bytes]]:
    """Request bodies per arm, one record each, for the same people."""
    import numpy as np
    import pandas as pd

    from mlops_ray.features.online import OnlineLookup
    from mlops_ray.registry import open_registry
    _, folder = open_registry(people["job"]).fetch("adult_people_mlp@production")
    sig = json.loads((folder / "signature.json").read_text())
    _, ffolder = open_registry(flat["job"]).fetch("adult_mlp@production")
    fsig = json.loads((ffolder / "signature.json").read_text())
    ent = sig["entity"]
    key = ent["join_key"]
    ids = pd.read_parquet(REPO / "mlops_ray" / "data" / "builtin" / "adult_people.parquet",
                          columns=[key])[key].drop_duplicates().to_numpy()
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rng.choice(ids, min(pool, len(ids)), replace=False)]
    look = OnlineLookup(ent)
    rows: list[dict] = []
    for i in range(0, len(keys), 500):  # raises (404) if the store lacks one of them
        rows += look.lookup(keys[i:i + 500])
    look.pool.shutdown()
    cols = [f["name"] for f in fsig["inputs"]]
    missing = [c for c in cols if c not in rows[0]]
    if missing:
        sys.exit(f"the flat model needs {missing}, which the online store does not hold")

    def plain(v: Any) -> Any:
        return v.item() if hasattr(v, "item") else v
    return {"entity": [json.dumps({"records": [{key: k}]}).encode() for k in keys],
            "flat": [json.dumps({"records": [{c: plain(r[c]) for c in cols}]}).encode()
                     for r in rows]}


async def load(url: str, body: list[bytes], n: int, conc: int, offset: int) -> dict[str, Any]:
    """n POSTs, conc in flight (closed loop); latency per request, wall time, errors."""
    import aiohttp
    lat: list[float] = []
    errors: list[str] = []
    nxt = 0
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=conc, force_close=False)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def worker() -> None:
            nonlocal nxt
            while nxt < n:
                i = nxt
                nxt += 1
                data = body[(offset + i) % len(body)]
                t0 = time.perf_counter()
                try:
                    async with s.post(url, data=data, headers=headers) as r:
                        text = await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError as e:
                    ok, text = False, repr(e).encode()
                dt = time.perf_counter() - t0
                if ok:
                    lat.append(dt * 1000)
                else:
                    errors.append(text[:200].decode(errors="replace"))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return {"lat": lat, "wall": wall, "errors": errors}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] if s else float("nan")


def measure(url: str, body: list[bytes], a: argparse.Namespace, offset: int) -> dict[str, Any]:
    w = asyncio.run(load(url, body, a.warmup, a.concurrency, offset))
    if w["errors"]:
        sys.exit(f"warm-up on {url}: {len(w['errors'])} errors, first: {w['errors'][0]}")
    r = asyncio.run(load(url, body, a.requests, a.concurrency, offset + a.warmup))
    lat = r["lat"]
    return {"p50": statistics.median(lat) if lat else float("nan"), "p90": pct(lat, 90),
            "p99": pct(lat, 99), "rps": len(lat) / r["wall"], "ok": len(lat),
            "errors": len(r["errors"]), "first_error": r["errors"][0] if r["errors"] else None}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="per arm per round")
    ap.add_argument("--warmup", type=int, default=200, help="untimed, before each measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--pool", type=int, default=5000, help="distinct people in the bodies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", action="store_true", help="leave the response cache on")
    ap.add_argument("--proxy", action="store_true", help="through Serve's proxy, not direct")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    a = ap.parse_args()

    # as tests/conftest.py: token auth of this process's own, replicas on their own port
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray
    work = Path(tempfile.mkdtemp(prefix="bench-fs-"))
    logfile = work / "pipelines.log"
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                   logging_level="WARNING", _node_ip_address="127.0.0.1")
    gcs = ctx.address_info["gcs_address"]
    try:
        port = free_port()
        print(f"local Ray {gcs}; Serve on 127.0.0.1:{port}; pipeline logs in {logfile}",
              file=sys.stderr)
        people = pipeline("adult_people_mlp", "fs-entity", work / "entity", gcs, port,
                          a.cache, logfile)
        flat = pipeline("adult_mlp", "fs-flat", work / "flat", gcs, port, a.cache, logfile)
        direct = [x["out"]["serving"]["direct_endpoint"] for x in (people, flat)]
        via = "direct" if all(direct) and not a.proxy else "proxy"
        urls = {arm: (x["out"]["serving"]["direct_endpoint"] if via == "direct"
                      else x["out"]["serving"]["endpoint"]) + "/predict"
                for arm, x in zip(ARMS, (people, flat))}
        body = bodies(people, flat, a.pool, a.seed)
        print(f"bodies: {len(body['entity'])} people; urls ({via}): {urls}", file=sys.stderr)
        rounds: list[dict[str, dict]] = []
        for r in range(a.rounds):
            order = ARMS if r % 2 == 0 else ARMS[::-1]
            res = {}
            for arm in order:  # the same people, in the same order, for both arms
                res[arm] = measure(urls[arm], body[arm], a,
                                   r * (a.requests + a.warmup))
                x = res[arm]
                print(f"  round {r + 1} {arm:6s}: p50 {x['p50']:.2f} p90 {x['p90']:.2f} "
                      f"p99 {x['p99']:.2f} ms, {x['rps']:.0f} req/s, {x['errors']} errors",
                      file=sys.stderr)
            rounds.append(res)
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start
    added = [x["entity"]["p50"] - x["flat"]["p50"] for x in rounds]
    ratio = [x["entity"]["p50"] / x["flat"]["p50"] for x in rounds]
    met = statistics.median(added) <= GOAL_MS
    print(f"\nFeature serving (#19): {a.requests} requests per arm per round after {a.warmup} "
          f"warm-up, concurrency {a.concurrency}, one record each, {a.rounds} rounds, "
          f"{via} ingress, response cache {'on' if a.cache else 'off'}; "
          f"{os.cpu_count()} cores, load average {load0[0]:.1f} at start, {load1[0]:.1f} at "
          f"end; {total:.0f} s in all")
    print("| arm | p50 ms | p90 ms | p99 ms | req/s | errors |")
    print("|---|---|---|---|---|---|")
    for arm in ARMS:
        col = {k: [x[arm][k] for x in rounds] for k in ("p50", "p90", "p99", "rps")}
        print(f"| {arm} | {med(col['p50'])} | {med(col['p90'])} | {med(col['p99'])} | "
              f"{statistics.median(col['rps']):.0f} ({min(col['rps']):.0f}-"
              f"{max(col['rps']):.0f}) | {sum(x[arm]['errors'] for x in rounds)} |")
    print(f"added p50 (entity - flat, per round): {med(added)} ms; p50 ratio entity/flat "
          f"{med(ratio)}")
    print(f"goal (added p50 <= {GOAL_MS:g} ms at concurrency {a.concurrency}): "
          f"{'MET' if met else 'NOT MET'}")
    if a.json:
        doc = {"args": vars(a), "via": via, "urls": urls, "rounds": rounds, "added_p50": added,
               "ratio_p50": ratio, "goal_met": met, "load_avg": [load0, load1],
               "seconds": total}
        text = json.dumps(doc, indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
