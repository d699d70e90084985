"""Shared fixtures and the tier guard.

Tiers by marker (pyproject.toml): unmarked unit tests start nothing; `ray` tests share one local
Ray cluster per test session; `slow` tests run the jobs (and other multi-process scenarios) as
subprocesses; `server` tests start a server process (PostgreSQL, moto S3); `multinode` tests a
multi-node cluster in their own process. A test that starts Ray or a subprocess without saying
so fails (`_tier_guard`), so `make test-unit` stays what it claims.

Session fixtures hold what many tests read: one local Ray (`ray_2_cpus`) and one finished,
small Adult run (`adult_run`, trained with the CI profile, conf/profile/ci.yaml).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray reads RAY_AUTH_MODE when it is first imported, and some test modules import Ray at
# collection time: set it before any of them. The session's Ray and every subprocess driver
# that joins it share this token (Ray 2.60 requires both for a separate client process).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
# S3 credentials (moto accepts any) from the standard variables, set before the session's Ray
# starts so its workers have them as a real cluster's pods would; the secret is unique to this
# session, so tests/security can look for it in everything written to storage
os.environ["AWS_ACCESS_KEY_ID"] = "AKIATESTSESSION"
os.environ["AWS_SECRET_ACCESS_KEY"] = f"moto-secret-{secrets.token_hex(12)}"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
# Jobs without ray.address attach to "this checkout's warm Ray" (mlops_ray/warm.py): in
# tests that is a folder of the session's own, never a developer's running cluster; a test that
# runs jobs on it takes the `warm_ray` fixture (its own folder, stopped after the test)
os.environ["MLOPS_RAY_WARM_DIR"] = str(Path(tempfile.mkdtemp(prefix="mlops-warm-")))
# admin and feedback keys a Serve test names by variable (replicas read them at start)
os.environ["MLOPS_TEST_ADMIN_KEYS"] = "adm-1"
os.environ["MLOPS_TEST_FEEDBACK_KEYS"] = "fb-1"
os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
# Serve's replicas and handles push autoscaling metrics every 10 s by default: the autoscaling
# test's look_back_period_s of 1 s needs them every half second (read when Serve starts)
os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
# what jobs.serve turns on for the local Ray it starts: ingress replicas answer on their own
# port (serve.direct_ingress); the Serve tests send their requests there
os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # no load balancer here


def dataset(experiment: str = "adult_mlp", *overrides: str):
    """An experiment's validated `dataset` section (a DatasetCfg)."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.train import TrainJob
    return job("train", TrainJob, [f"+experiment={experiment}", *overrides]).dataset


def in_process(config: str, schema, overrides: list[str], fn) -> int:
    """What `python -m jobs.<job> overrides...` does, in this process: compose, validate, run
    `fn(job)`; returns the exit code (0, or the typed error's; its message on stderr)."""
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.errors import user_errors
    try:
        with user_errors():
            fn(validate(compose(config, overrides), schema))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROFILE = ["+experiment=adult_mlp", "+profile=ci"]  # small runs of every stage (conf/profile)
SERVICE = {"ray", "slow", "server", "s3", "multinode"}  # markers of tests that start things


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """An unmarked (unit) test may not start Ray or another process (git aside): fail it,
    naming the marker it needs."""
    marks = {m.name for m in request.node.iter_markers()}
    if marks & SERVICE:
        yield
        return
    real = subprocess.Popen.__init__

    def popen(self, args, *a, **kw):  # noqa: ANN001 - subprocess's own signature
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        if Path(str(argv[0])).name != "git":
            raise AssertionError(f"{request.node.nodeid} starts a process ({argv[:3]}); mark it "
                                 "slow (a job), server (a server) or ray")
        real(self, args, *a, **kw)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray without the `ray` marker")


@pytest.fixture
def warm_ray(tmp_path, monkeypatch):
    """A warm-Ray folder of this test's own (subprocess jobs inherit it through the
    environment); whatever warm Ray the test's jobs started there is stopped afterwards, by its
    processes' pids."""
    folder = tmp_path / "warm"
    monkeypatch.setenv("MLOPS_RAY_WARM_DIR", str(folder))
    yield folder
    from mlops_ray import warm
    warm.stop(folder, quiet=True)


@pytest.fixture(scope="session", autouse=True)
def _no_warm_ray_left():
    """The session's default warm folder: stopped at the end if a job started one there."""
    yield
    from mlops_ray import warm
    warm.stop(Path(os.environ["MLOPS_RAY_WARM_DIR"]), quiet=True)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_server(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a server this session started, by its pid: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def kill_pids(pids) -> list[int]:
    """SIGKILL these processes (ones a test found at a step gate, by pid)."""
    import signal
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return list(pids)


def committed(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has registered (what a restart resumes from)."""
    import json
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """A step gate (mlops_ray.train.gate) for runs this test drives in-process; subprocess
    drivers get it with `job_env(**gate.env)`. Kill tests hold the run at a step, act, then
    release it: what the run has done when the fault comes is fixed, whatever the speed."""
    from mlops_ray.train.gate import Gate
    g = Gate(tmp_path / "gate")
    for k, v in g.env.items():
        monkeypatch.setenv(k, v)
    return g


@pytest.fixture(scope="session")
def ray_2_cpus():
    """One local Ray cluster (2 CPUs, token auth on) for the whole session.

    Subprocess drivers join it with `ray.address=<address>`; as Ray 2.60 requires of separate
    client processes, they get RAY_AUTH_MODE=token and the token through the environment.
    """
    import ray
    # Prometheus text of Ray's metrics agent (custom metrics included) on this port
    os.environ["MLOPS_TEST_RAY_METRICS_PORT"] = str(free_port())
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                   _node_ip_address="127.0.0.1",
                   _metrics_export_port=int(os.environ["MLOPS_TEST_RAY_METRICS_PORT"]),
                   # metrics reach the endpoint within ~2 s instead of Ray's 10 s
                   _system_config={"metrics_report_interval_ms": 2000})
    from mlops_ray.runtime import claim_address_file
    claim_address_file(ctx.address_info["gcs_address"])
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def adult_run(ray_2_cpus, tmp_path_factory) -> dict:
    """A finished Adult run (the CI profile: 2 epochs), trained once for the session. Tests
    that write next to a run (evaluation) take a copy (`copy_run`)."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.pipeline import PipelineJob
    from mlops_ray.train.driver import run_training
    store = tmp_path_factory.mktemp("adult_run")
    return run_training(job("pipeline", PipelineJob, [*PROFILE, f"storage.uri={store}"])
                        .train_job(), log=lambda _: None)


def copy_run(rec: dict, storage: Path, name: str | None = None) -> dict:
    """A copy of a finished run under `storage`/runs/ (as run `name` if given: the same
    model trained again under another name), its record pointing at the copy."""
    import json
    import shutil
    src = Path(rec["run_uri"].removeprefix("file://"))
    dst = storage / "runs" / (name or src.name)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
    text = (dst / "run.json").read_text().replace(f"file://{src}", f"file://{dst}")
    copied = json.loads(text)
    if name:
        copied["run_name"] = name
    (dst / "run.json").write_text(json.dumps(copied, indent=2))
    return copied


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 started (and stopped, by its pid) by this session."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(url, timeout=1).status < 500
        except OSError:
            return False
    try:
        wait_until(up, 30, what="moto server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(moto_s3):
    import boto3
    name = f"b-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def job_env(**extra: str | None) -> dict[str, str]:
    """The test environment plus `extra`; a None value removes that variable."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_job(args: list[str], timeout: float = 300, **env: str | None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=job_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _pg_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (package postgresql), if installed."""
    import glob
    import shutil
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 started by this session (initdb into a temp folder),
    stopped by its own pg_ctl; yields a URL prefix. Skipped, saying why, where Debian's
    postgresql package is not installed (`.ci/run` installs it)."""
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql); "
                    "the registry was tested on SQLite only")
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")
    import shutil
    import tempfile
    # not under pytest's 0700 temp root: the server's user must reach the folder
    base = Path(tempfile.mkdtemp(prefix="mlops-ray-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    pre: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        pre = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*pre, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*pre, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                    str(base / "log"), "-o", f"-h 127.0.0.1 -p {port} -k {sock}", "start"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*pre, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def new_pg_database(server_url: str) -> str:
    import psycopg
    name = f"t_{secrets.token_hex(4)}"
    with psycopg.connect(server_url.replace("+psycopg", "") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server_url}/{name}"


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log
    (32 KiB blocks, 7-byte record headers after a 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, part, records = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            records.append(rec)
    return records


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows (one per `log` call) of an offline W&B run file."""
    import json
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


def wandb_group(run_file: Path) -> str:
    return next(r.run.run_group for r in wandb_records(run_file)
                if r.WhichOneof("record_type") == "run")


def read_ray_address_file() -> str | None:
    """The cluster /tmp/ray/ray_current_cluster names (this machine's default Ray)."""
    from ray._private.utils import read_ray_address
    return read_ray_address()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server on 127.0.0.1 (no persistence, a temp folder) started by this session and
    stopped by its pid; yields the port. Skipped, saying why, where Debian's redis-server is not
    installed (`.ci/run` installs it)."""
    binary = Path("/usr/bin/redis-server")
    if not binary.exists():
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure
            pytest.fail("redis-server not installed in CI (.ci/run installs Debian's package)")
        pytest.skip("redis-server not installed (Debian package redis-server)")
    import redis
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = (folder / "redis.log").open("w")
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=log, stderr=subprocess.STDOUT)
    r = redis.Redis(host="127.0.0.1", port=port)

    def up():
        assert proc.poll() is None, (folder / "redis.log").read_text()
        try:
            return r.ping()
        except redis.ConnectionError:
            return False
    try:
        wait_until(up, 30, interval=0.05, what="redis-server answering PING")
        yield port
    finally:
        r.close()
        stop_server(proc)
        log.close()
