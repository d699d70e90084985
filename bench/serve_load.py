"""Closed-loop HTTP load on the served Adult MLP, every arm in one run on this machine.

    python bench/serve_load.py                       # concurrency 1, 16, 64; 8 s per point
    python bench/serve_load.py --duration 15 --concurrency 16 --arms a d
    python bench/serve_load.py --predlog-only --repeats 5   # (l) alone: log on vs off

Arms (one POST /predict of one Adult row per request, load from `wrk` on the same machine):
  (a) jobs.serve's app as configured by default (conf/serve.yaml, conf/ray/local.yaml), cache off,
      at the URL jobs.serve prints: the ingress replica's own port (direct ingress, no proxy hop)
  (p) (a) through Serve's HTTP proxy (serve.direct_ingress=false): the path before direct ingress
  (f) (a) serving a version whose decision rule has the fairness post-processor (group thresholds
      on `sex`, as fairness.mitigation=threshold registers it)
  (b) (a) with its response cache on, every request the same row
  (c) Ray Serve with Ray's defaults: one FastAPI deployment doing the same work, default proxy
  (d) bare FastAPI + uvicorn in one process doing the same work (validation, preprocessing, model)
  (h) (p) behind Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1; needs haproxy; opt-in)
  (l) the prediction log's cost: two apps as (a) on one Ray, identical but for
      serve.prediction_log.enabled=true / false, loaded alternately (on, off, off, on, ...) at
      --predlog-concurrency for --repeats rounds, each run right after a 2 s warm-up of its own
      app; the bodies cycle through distinct test rows (a log of one repeated row would
      compress unrealistically well). Medians, spread and the on/off ratio; then the log app is
      deleted (its replica drains: the buffer is written) and the Parquet parts are counted:
      rows, bytes, bytes per 1M predictions (linear in the rows logged), also compacted into one
      part.
Prints req/s, p50, p99 and errors per arm and concurrency, and the ratios to (c) and (d).
Needs `wrk` (apt-get install wrk).
"""
# no `from __future__ import annotations`: FastAPI must see the real Request type

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "adult_mlp"


def make_registry(work: Path) -> dict:
    """A registry with one version of the default model (MLP 256-256 on 108 inputs)."""
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
    model = build(cfg["model"], in_features=p.preprocessor.n_features)  # weights don't matter here
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    rows = p.frame.iloc[p.splits["train"]]
    ds = {"label": p.label, "positive": p.positive, "sensitive": p.sensitive}
    sig = signature(p.preprocessor, ds, 0.5, False)
    files = {"model.pt": buf.getvalue(),
             "meta.json": json.dumps({"model": cfg["model"],
                                      "in_features": p.preprocessor.n_features}).encode(),
             "preprocessor.json": json.dumps(p.preprocessor.to_dict()).encode(),
             "signature.json": json.dumps(sig).encode(),
             "reference.json": json.dumps(profile(rows, p.preprocessor.numeric,
                                                  p.preprocessor.categorical)).encode()}
    reg = Registry(f"sqlite:///{work / 'mlops_ray.db'}", resolve(str(work)), Policy.default())
    from mlops_ray.artifacts import rule as R
    from mlops_ray.registry.signing import sign

    def register(decision: dict, alias: str) -> Any:
        # the verdict a registry accepts: a passed gate report signed with its key, naming the
        # decision rule it judged
        report = {"passed": True, "champion": None, "rule_sha256": R.digest(decision),
                  "lineage": {"run": f"bench-{alias}", "data_version": None,
                              "config_hash": None}}
        sig_ = signature(p.preprocessor, ds, 0.5, False, decision)
        v = reg.register(MODEL, {**files, "signature.json": json.dumps(sig_).encode(),
                                 "rule.json": json.dumps(decision).encode(),
                                 "gate_report.json": json.dumps(sign(report, reg.key)).encode()},
                         {"run_uri": f"bench-{alias}"})
        reg.set_alias(MODEL, alias, v.version, expected=None)
        return v
    v = register(R.plain(0.5), "production")
    # (f): the fairness post-processor as Fairlearn's ThresholdOptimizer leaves it (two
    # randomised thresholds per group, mixed with a constant): the work per request is this
    groups = {g: {"ops": [[0.6, ">", 0.45 + 0.01 * i], [0.4, ">", 0.55 - 0.01 * i]],
                  "p_ignore": 0.1, "constant": 0.3}
              for i, g in enumerate(sorted(p.frame["sex"].astype(str).unique()))}
    register({"threshold": 0.5, "postprocessor": {
        "kind": "group_thresholds", "attribute": "sex", "constraint": "equalized_odds",
        "groups": groups}}, "fair")
    test = p.frame.iloc[p.splits["test"]]
    cols = [f["name"] for f in sig["inputs"]]
    record = json.loads(test[cols].head(1).to_json(orient="records"))[0]
    # (l): distinct complete rows, each a request body of its own
    records = json.loads(test[cols].dropna().head(4000).to_json(orient="records"))
    return {"folder": v.artifact_uri.removeprefix("file://"), "ref": v.ref, "record": record,
            "records": records, "features": p.preprocessor.n_features}


# ------------------------------------------------------------------------------ servers
def bare_app(folder: str, ref: str):
    """(d): the same per-request work as the Serve arms, in one uvicorn process."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from mlops_ray.artifacts.predictor import Predictor
    from mlops_ray.errors import RequestInvalid
    from mlops_ray.serving.schema import validate_records
    pred = Predictor.load(folder, ref)
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        try:
            recs = validate_records((await request.json())["records"], pred.signature, 1000)
        except RequestInvalid as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        p, y = pred.predict_records(recs)
        return {"model": MODEL, "version": ref, "probabilities": p.tolist(), "labels": y.tolist()}
    return app


def serve_defaults_app(folder: str, ref: str):
    """(c): the same work as one Serve deployment with every option at Ray's default."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve
    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Plain:
        def __init__(self):
            from mlops_ray.artifacts.predictor import Predictor
            self.pred = Predictor.load(folder, ref)

        @api.post("/predict")
        async def predict(self, request: Request):
            from mlops_ray.errors import RequestInvalid
            from mlops_ray.serving.schema import validate_records
            try:
                recs = validate_records((await request.json())["records"],
                                        self.pred.signature, 1000)
            except RequestInvalid as e:
                return JSONResponse({"error": str(e)}, status_code=422)
            p, y = self.pred.predict_records(recs)
            return {"model": MODEL, "version": ref, "probabilities": p.tolist(),
                    "labels": y.tolist()}
    return Plain.bind()


def serve_job(arm: str, work: Path, port: int, extra: list[str] = ()) -> Any:
    """jobs.serve's job as (a) configures it, `arm`'s differences and `extra` overrides."""
    from mlops_ray.config.compose import job as compose_job
    from mlops_ray.config.serve import ServeJob
    return compose_job("serve", ServeJob, [
        f"ref={MODEL}@{'fair' if arm == 'f' else 'production'}", f"storage.uri={work}",
        f"serve.port={port}", "ray.num_cpus=2", "ray.include_dashboard=false",
        f"serve.direct_ingress={'false' if arm in ('p', 'h') else 'true'}",
        f"serve.cache.enabled={'true' if arm == 'b' else 'false'}", *extra])


PREDLOG_APPS = {"on": "true", "off": "false"}  # (l): app suffix -> serve.prediction_log.enabled


def predlog_jobs(work: Path, port: int) -> dict[str, Any]:
    """(l): two apps of (a) on one Ray, identical but for the prediction log; the log in its
    own folder, so that only this arm's parts are counted."""
    return {k: serve_job("l", work, port, [
        f"serve.app_name=bench-log-{k}", f"serve.route_prefix=/{k}",
        f"serve.prediction_log.enabled={on}",
        f"serve.prediction_log.uri={work / 'predlog-bench'}"])
        for k, on in PREDLOG_APPS.items()}


def run_server(arm: str, work: Path, port: int, info: dict) -> None:
    """Runs in a child process until SIGTERM."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    if arm == "d":
        import uvicorn
        uvicorn.run(bare_app(info["folder"], info["ref"]), host="127.0.0.1", port=port,
                    log_level="warning", access_log=False)
        return
    import ray
    from ray import serve
    if arm == "c":
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serve_defaults_app(info["folder"], info["ref"]), name="plain",
                  route_prefix="/")
    elif arm == "l":
        from mlops_ray.registry import open_registry
        from mlops_ray.serving import control, rollout
        jobs = predlog_jobs(work, port)
        control.start(jobs["on"])
        for job in jobs.values():
            rollout.serve_ref(job, open_registry(job), log=lambda _: None)
        for k, job in jobs.items():
            url = control.direct_endpoint(job) or f"http://127.0.0.1:{port}/{k}"
            (work / f"url-l-{k}.txt").write_text(url + "/predict")
    else:
        if arm == "h":  # Serve's HAProxy ingress instead of its Python proxy (opt-in)
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        from mlops_ray.registry import open_registry
        from mlops_ray.serving import control, rollout
        job = serve_job(arm, work, port)
        control.start(job)
        rollout.serve_ref(job, open_registry(job), log=lambda _: None)
        # where jobs.serve tells clients to go: the replica's own port (direct ingress)
        url = control.direct_endpoint(job) if arm not in ("p", "h") else None
        (work / f"url-{arm}.txt").write_text((url or f"http://127.0.0.1:{port}") + "/predict")
    if arm == "c":
        (work / f"url-{arm}.txt").write_text(f"http://127.0.0.1:{port}/predict")
    # ray.init installed its own SIGTERM handler (the process dies at once): ours again, so that
    # the apps drain and Serve and Ray shut down
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    print("READY", flush=True)
    while not stop["now"]:
        time.sleep(0.2)
    if arm == "l":  # the replica drains: Ingress.__del__ writes the log's buffer
        serve.delete("bench-log-on", _blocking=True)
        (work / "drained-l.txt").write_text("1")
    serve.shutdown()
    ray.shutdown()


# ------------------------------------------------------------------------------ load
def wrk(url: str, body: str | list[str], conns: int, duration: float) -> dict:
    """Closed-loop load: one body for every request, or a list the requests cycle through
    (each wrk thread from its own offset)."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    threads = min(2, conns)
    lua = "wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\n"
    if isinstance(body, str):
        lua += f"wrk.body = {json.dumps(body)}\n"
    else:  # JSON string literals are Lua string literals for ASCII text
        assert all(b.isascii() for b in body)
        lua += ("bodies = {" + ",\n".join(json.dumps(b) for b in body) + "}\n"
                "local n = 0\nlocal threads = 0\n"
                "function setup(thread) thread:set('tid', threads); threads = threads + 1 end\n"
                f"function init(args) n = tid * math.floor(#bodies / {threads}) end\n"
                "function request()\n  n = n % #bodies + 1\n"
                "  return wrk.format(nil, nil, nil, bodies[n])\nend\n")
    script.write_text(lua)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
                          "--latency", "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    script.unlink()

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups()))
                                                       if sock else 0)
    return {"rps": rps, "p50": ms("50%"), "p99": ms("99%"), "errors": errors, "requests": total}


def log_parts(root: Path) -> list[Path]:
    """The prediction log's written parts (not the temporary names of parts being written)."""
    return sorted(root.glob("predictions/model=*/date=*/part-*.parquet"))


def log_rows(root: Path) -> int:
    import pyarrow.parquet as pq
    return sum(pq.read_metadata(f).num_rows for f in log_parts(root))


def wait_logged(root: Path, answered: int, flush_s: float, timeout: float = 60) -> int:
    """Wait until the log holds at least `answered` rows and has stopped growing for longer
    than a flush interval (requests in flight when wrk stopped were answered and logged but
    not counted by wrk); the rows it holds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = log_rows(root)
        if n != last:
            last, since = n, time.monotonic()
        elif n >= answered and time.monotonic() - since > flush_s + 0.5:
            return n
        time.sleep(0.25)
    raise RuntimeError(f"the prediction log holds {last} rows, {answered} answered, after "
                       f"{timeout:.0f} s")


def log_size(root: Path) -> dict:
    """Rows and bytes of the parts as written, and of the same rows compacted into one part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops_ray.data import traffic
    files = log_parts(root)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {"parts": len(files), "rows": table.num_rows,
            "bytes": sum(f.stat().st_size for f in files),
            "compacted_bytes": len(traffic.parquet_bytes(table)),
            "distinct_features": len(set(table.column("features").to_pylist()))}


def wait_http(url: str, body: bytes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
            if urllib.request.urlopen(req, timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def start_server(arm: str, work: Path, env: dict, urls: list[str]) -> tuple[Any, list[str]]:
    """The child serving `arm` and the URLs (files named in `urls`) once it writes them."""
    from tests.conftest import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", arm, "--work", str(work),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / f"server-{arm}.log", "w"))
    if not urls:
        return proc, [f"http://127.0.0.1:{port}/predict"]
    deadline = time.monotonic() + 300
    while not all((work / u).exists() for u in urls):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"({arm}) did not start: see {work}/server-{arm}.log")
        time.sleep(0.5)
    return proc, [(work / u).read_text() for u in urls]


def stop_server(proc: Any, timeout: float = 60) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def predlog_arm(args: Any, work: Path, env: dict, info: dict) -> dict:
    """(l): the ingress with the prediction log on vs off, alternated in one run."""
    from mlops_ray.config.serve import PredictionLogCfg
    flush_s = PredictionLogCfg().flush_interval_s  # conf/serve/default.yaml's, unchanged here
    bodies = [json.dumps({"records": [r]}) for r in info["records"]]
    root = work / "predlog-bench"
    t0 = time.monotonic()
    proc, (url_on, url_off) = start_server("l", work, env, ["url-l-on.txt", "url-l-off.txt"])
    urls = {"on": url_on, "off": url_off}
    c = args.predlog_concurrency
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    answered = 0  # 2xx answers of the log app, each logged
    try:
        for k in urls:
            wait_http(urls[k], bodies[0].encode())
        answered += 1
        print(f"(l) up in {time.monotonic() - t0:.1f} s: on {url_on}, off {url_off}", flush=True)
        for i in range(args.repeats):
            # on off | off on | on off ...: a drift in time weighs on both arms alike
            for k in (("on", "off") if i % 2 == 0 else ("off", "on")):
                w = wrk(urls[k], bodies, c, 2)  # warm-up: its rows are written in the run
                r = wrk(urls[k], bodies, c, args.duration)
                runs[k].append(r)
                if k == "on":  # the run's last rows written before the other arm's run
                    answered += w["requests"] - w["errors"] + r["requests"] - r["errors"]
                    r["logged_total"] = wait_logged(root, answered, flush_s)
                print(f"(l) {i + 1}/{args.repeats} log {k:<3} c={c:<3} {r['rps']:8.1f} req/s  "
                      f"p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  errors {r['errors']}",
                      flush=True)
    finally:
        stop_server(proc, 120)  # deletes the log app first: its replica drains the buffer
    drained = (work / "drained-l.txt").exists()
    size = log_size(root)
    return {"runs": runs, "size": size, "answered": answered, "drained": drained,
            "concurrency": c, "flush_s": flush_s, "bodies": len(bodies)}


def predlog_report(res: dict) -> None:
    runs, size = res["runs"], res["size"]
    rps = {k: [r["rps"] for r in runs[k]] for k in runs}
    med = {k: statistics.median(v) for k, v in rps.items()}
    pairs = [a / b for a, b in zip(rps["on"], rps["off"], strict=True)]
    print(f"\n(l) prediction log on vs off, concurrency {res['concurrency']}, "
          f"{len(rps['on'])} alternated runs per arm; median [min-max]")
    print("log   req/s                       p50 ms     p99 ms     errors")
    for k in ("on", "off"):
        print(f"{k:<5} {spread(rps[k]):<27} "
              f"{statistics.median(r['p50'] for r in runs[k]):8.1f}  "
              f"{statistics.median(r['p99'] for r in runs[k]):8.1f}  "
              f"{sum(r['errors'] for r in runs[k]):6d}")
    print(f"on/off: {med['on'] / med['off']:.3f}x (ratio of medians); per round "
          f"{statistics.median(pairs):.3f}x [{min(pairs):.3f}-{max(pairs):.3f}]; goal >= 0.9x")
    rows = size["rows"]
    print(f"log: {rows} rows in {size['parts']} parts ({rows / max(1, size['parts']):.0f} rows "
          f"per part, flush every {res['flush_s']:g} s), {size['bytes']} bytes; {res['answered']} "
          f"answers counted by wrk{'' if res['drained'] else ' (the app did NOT drain)'}; "
          f"{size['distinct_features']} distinct inputs of {res['bodies']} bodies")
    if rows:
        print(f"bytes per 1M predictions, linear from the {rows} rows logged: as written "
              f"{size['bytes'] / rows * 1e6 / 2**20:.1f} MiB ({size['bytes'] / rows:.1f} B/row); "
              f"compacted into one part {size['compacted_bytes'] / rows * 1e6 / 2**20:.1f} MiB "
              f"({size['compacted_bytes'] / rows:.1f} B/row)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--arms", nargs="+", default=["a", "p", "f", "b", "c", "d", "l"])
    ap.add_argument("--predlog-only", action="store_true",
                    help="only (l): the prediction log on vs off (--arms l)")
    ap.add_argument("--repeats", type=int, default=5, help="(l): runs per arm, alternated")
    ap.add_argument("--predlog-concurrency", type=int, default=16, help="(l): wrk connections")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # child: run one server
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args.serve, Path(args.work), args.port,
                   json.loads((Path(args.work) / "info.json").read_text()))
        return
    if not shutil.which("wrk"):
        sys.exit("bench/serve_load.py needs wrk (apt-get install wrk)")
    if args.predlog_only:
        args.arms = ["l"]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    info = make_registry(work)
    (work / "info.json").write_text(json.dumps(info))
    body = json.dumps({"records": [info["record"]]})
    results: dict[str, dict[int, dict]] = {}
    predlog: dict | None = None
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    for arm in args.arms:
        if arm == "l":
            predlog = predlog_arm(args, work, env, info)
            continue
        t0 = time.monotonic()
        # the child writes the URL clients use, once it serves
        proc, (url,) = start_server(arm, work, env, [] if arm == "d" else [f"url-{arm}.txt"])
        try:
            wait_http(url, body.encode())
            print(f"({arm}) up in {time.monotonic() - t0:.1f} s", flush=True)
            wrk(url, body, 4, 2)  # warm-up
            results[arm] = {}
            for c in args.concurrency:
                results[arm][c] = r = wrk(url, body, c, args.duration)
                print(f"({arm}) c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50']:7.1f} ms  "
                      f"p99 {r['p99']:7.1f} ms  errors {r['errors']}", flush=True)
        finally:
            stop_server(proc)
    arms = [a for a in args.arms if a != "l"]
    if arms:
        print("\nconcurrency  arm  req/s     p50 ms   p99 ms  errors  vs (c)  vs (d)")
    for c in args.concurrency if arms else []:
        for arm in arms:
            r = results[arm][c]
            rc = results.get("c", {}).get(c)
            rd = results.get("d", {}).get(c)
            print(f"{c:<12} ({arm})  {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} "
                  f"{r['errors']:6d}  {r['rps'] / rc['rps'] if rc else float('nan'):6.2f}x "
                  f"{r['rps'] / rd['rps'] if rd else float('nan'):6.2f}x")
    if predlog is not None:
        predlog_report(predlog)
    print(f"\nlogs and registry: {work}")


if __name__ == "__main__":
    main()
