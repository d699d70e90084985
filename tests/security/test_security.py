"""The registry and the endpoint as trust boundaries (issue #23): each test plays one finding of
the security review against the real component and fails on the code before the fix.

Most run without Ray (the registry on SQLite, the request limits, the bind check, the audit
chain); the storage scan after a tune on S3 runs on the session's Ray against moto, the study
database's password against the session's PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import torch

from mlops_ray.errors import ConfigError, PermissionDenied, RequestInvalid, UnsafeArtifact
from mlops_ray.registry import Policy, Registry
from mlops_ray.registry.policy import TOKEN_ENV, token_hash
from mlops_ray.registry.signing import sign
from mlops_ray.storage import resolve
from tests.serving import passed_report

MLP = {"_target_": "mlops_ray.models.mlp.MLP", "hidden": [4]}
POLICY = Policy({"admin": ["ada"], "approver": ["pat"], "viewer": ["*"]},
                {token_hash("tok-ada"): "ada", token_hash("tok-pat"): "pat"}, "test policy")


def registry(tmp_path: Path, policy: Policy | None = None, actor: str | None = None) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'reg.db'}", resolve(str(tmp_path / "store")),
                    policy, actor=actor)


def version_files(reg: Registry, meta: dict, model: dict | None = None,
                  report: bytes | None = None) -> dict[str, bytes]:
    net = __import__("mlops_ray.models", fromlist=["MLP"]).MLP(3, hidden=[4])
    import io
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return {"model.pt": buf.getvalue(),
            "meta.json": json.dumps({"model": model or MLP, "in_features": 3}).encode(),
            "gate_report.json": report if report is not None else passed_report(reg, meta)}


class Canary:
    """A file that appears only if attacker-chosen code ran."""

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "PWNED"

    def ran(self) -> bool:
        return self.path.exists()


# ---------------------------------------------------------------- artifacts are data


@pytest.mark.parametrize("target", [
    "builtins.exec",
    "hydra.utils.instantiate",  # nested _target_ specs ran arbitrary builtins (review, #1)
    "os.system",
])
def test_a_model_builder_outside_the_allowlist_is_refused_at_register(tmp_path, target):
    reg = registry(tmp_path)
    canary = Canary(tmp_path)
    evil = {"_target_": target, "config": {"_target_": "os.system",
                                           "command": f"touch {canary.path}"}}
    with pytest.raises(UnsafeArtifact, match="not an allowed model builder"):
        reg.register("m", version_files(reg, {"run_uri": "r1"}, model=evil), {"run_uri": "r1"})
    assert reg.models() == [] and not canary.ran()
    refused = [a for a in reg.audit_log() if a["outcome"] == "refused"]
    assert refused and target in json.loads(refused[-1]["details"])["refused"]


def test_a_malicious_model_spec_is_refused_at_load(tmp_path):
    """A checkpoint or a version folder whose meta.json names code: refused, nothing runs."""
    from mlops_ray.artifacts import checkpoint as ckpt_io
    from mlops_ray.artifacts.predictor import Predictor
    canary = Canary(tmp_path)
    for folder, spec in ((tmp_path / "ckpt", {"_target_": "os.system",
                                               "command": f"touch {canary.path}"}),
                         (tmp_path / "version", {**MLP, "hidden": {"_target_": "os.system"}})):
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"model": spec, "in_features": 3}))
        (folder / "preprocessor.json").write_text("{}")
        torch.save({"model": {}}, folder / "state.pt")
        with pytest.raises(UnsafeArtifact):
            ckpt_io.load_model(folder)
    with pytest.raises(UnsafeArtifact, match="only numbers, strings"):
        Predictor.load(tmp_path / "version", "m:1")
    assert not canary.ran()


def test_a_pickle_payload_in_a_checkpoint_does_not_execute(tmp_path):
    from mlops_ray.artifacts import checkpoint as ckpt_io
    canary = Canary(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary.path}",))
    torch.save({"model": {}, "rng": Payload()}, tmp_path / "state.pt")
    with pytest.raises(UnsafeArtifact, match="holds objects"):
        ckpt_io.load_state(tmp_path)
    assert not canary.ran()


def test_a_checkpoint_edited_after_its_run_is_refused(tmp_path):
    """run.json records each checkpoint's digest; the stages after training verify it."""
    from mlops_ray.artifacts import checkpoint as ckpt_io
    from mlops_ray.artifacts.runs import verified_checkpoint
    d = tmp_path / "runs" / "r" / "checkpoint_e0001_s00000"
    d.mkdir(parents=True)
    ckpt_io.save(d, {"model": {"w": torch.ones(2)}, "rng": ckpt_io.rng_state()},
                 {"model": MLP, "in_features": 3}, {})
    rec = {"run_name": "r", "checkpoints": {"best": f"file://{d}",
                                            "digest": {"best": ckpt_io.digest(d)}}}
    assert ckpt_io.load_state(verified_checkpoint(rec, "best", {}, str(tmp_path)))["rng"]
    torch.save({"model": {"w": torch.zeros(2)}}, d / "state.pt")
    with pytest.raises(UnsafeArtifact, match="do not match the digest"):
        verified_checkpoint(rec, "best", {}, str(tmp_path))
    with pytest.raises(UnsafeArtifact, match="no checkpoint digest"):
        verified_checkpoint({**rec, "checkpoints": {"best": f"file://{d}"}}, "best", {},
                            str(tmp_path))


# ---------------------------------------------------------------- promotion cannot be faked


def test_a_forged_gate_report_does_not_move_production(tmp_path):
    """A trainer writes a 'passed' report (unsigned, or signed with a key of its own) and
    claims gate_passed in the metadata: the registry reads the verdict from the report and
    trusts only its own key, so production stays where it is."""
    reg = registry(tmp_path)
    good = {"run_uri": "run-good", "data_version": "d", "config_hash": "c"}
    v1 = reg.register("m", version_files(reg, good), good)
    reg.set_alias("m", "production", v1.version, expected=None)
    forged_meta = {"run_uri": "run-weak", "data_version": "d", "config_hash": "c2",
                   "gate_passed": True, "champion_run": "run-good"}
    report = {"passed": True, "champion": {"run": "run-good"},
              "lineage": {"run": "run-weak", "data_version": "d", "config_hash": "c2"}}
    for n, forged in enumerate([json.dumps(report).encode(),  # unsigned
                                json.dumps(sign(report, b"the trainer's own key")).encode(),
                                # signed, but about another run
                                passed_report(reg, {**good, "run_uri": "run-other"})]):
        v = reg.register("m", {**version_files(reg, forged_meta, report=forged),
                               "n": str(n).encode()}, forged_meta)
        assert v.gate_passed is False
        with pytest.raises(PermissionDenied, match="failed its validation gates"):
            reg.set_alias("m", "production", v.version)
    assert reg.aliases("m")["production"] == v1.version


def test_promote_does_not_reuse_a_forged_report_or_fold_results(tmp_path):
    """What promote and a rerun of the evaluation read from the run folder: a report or a CV
    fold result written without the registry key is not used (it is evaluated again)."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.evaluate import EvaluateJob
    from mlops_ray.pipeline.evaluate import signing_key, stored_report
    store = tmp_path / "store"
    run = store / "runs" / "weak"
    (run / "eval").mkdir(parents=True)
    rec = {"run_uri": f"file://{run}", "run_name": "weak", "config_hash": "c",
           "dataset": {"version": "d"}, "checkpoints": {"digest": {"best": "x"}},
           "config": {"dataset": {"sensitive": ["sex"]}}}
    ev = job("evaluate", EvaluateJob, ["+experiment=adult_mlp", f"run={run}",
                                       f"storage.uri={store}"])
    from mlops_ray.pipeline.evaluate import evaluation_inputs
    forged = {"passed": True, "champion": None, "gates": [], "inputs": evaluation_inputs(ev, rec),
              "lineage": {"run": rec["run_uri"], "data_version": "d", "config_hash": "c",
                          "checkpoint_digest": "x"}}
    (run / "eval" / "gate_report.json").write_text(json.dumps(forged))
    report, why = stored_report(ev, rec, resolve(str(run)), None)
    assert report is None and "not signed with the registry key" in why
    # the same report signed with the registry's key passes that check (and then meets the
    # gate-rule check: this forged one names no rules)
    (run / "eval" / "gate_report.json").write_text(json.dumps(sign(forged, signing_key(ev))))
    assert "not signed" not in stored_report(ev, rec, resolve(str(run)), None)[1]


def test_user_impersonation_and_policy_null_are_refused(tmp_path, monkeypatch, capsys):
    """Under a policy only a token is an identity: USER=ada is anonymous. The policy is the one
    stored in the registry: registry.policy=null or another file does not switch it off."""
    from jobs.registry import main
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY.text())
    admin = registry(tmp_path, Policy.load(str(policy_file)), actor="ada")  # installs it
    meta = {"run_uri": "r1", "data_version": "d", "config_hash": "c"}
    v = admin.register("m", version_files(admin, meta), meta)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv("USER", "ada")
    monkeypatch.setenv("LOGNAME", "ada")
    as_user = registry(tmp_path)  # what registry.policy=null gives a job
    assert as_user.actor == "anonymous" and as_user.policy.source.startswith("stored")
    with pytest.raises(PermissionDenied, match="'anonymous' .* needs the approver role"):
        as_user.set_alias("m", "production", v.version)
    common = [f"db.url=sqlite:///{tmp_path / 'reg.db'}", f"storage.uri={tmp_path / 'store'}"]

    def cli(*args: str) -> int:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([*args, *common])
        return int(e.value.code or 0)
    assert cli("approve", "m:1", "--reason", "x", "registry.policy=null") == 7
    lax = tmp_path / "lax.yaml"
    lax.write_text("roles: {admin: ['*']}\n")
    assert cli("approve", "m:1", "--reason", "x", f"registry.policy={lax}") == 7
    assert "differs" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "tok-pat")  # the approver's token works
    assert cli("approve", "m:1", "--reason", "reviewed") == 0
    monkeypatch.setenv(TOKEN_ENV, "tok-pat")
    assert cli("policy", "set", str(lax)) == 7  # only an admin replaces the policy
    assert registry(tmp_path).aliases("m")["production"] == 1


def test_the_laptop_key_file_is_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("MLOPS_RAY_REGISTRY_KEY", raising=False)
    registry(tmp_path)
    mode = stat.S_IMODE((tmp_path / "reg.key").stat().st_mode)
    assert mode == 0o600
    with pytest.raises(Exception, match="MLOPS_RAY_REGISTRY_KEY is not set"):
        from mlops_ray.registry.signing import key_for
        key_for("postgresql://u@127.0.0.1/db")


def test_an_edited_alias_row_is_caught_by_audit_verify(tmp_path, capsys):
    from jobs.registry import main
    reg = registry(tmp_path)
    metas = [{"run_uri": f"r{i}", "data_version": "d", "config_hash": f"c{i}"} for i in (1, 2)]
    for m in metas:
        reg.register("m", {**version_files(reg, m), "n": m["run_uri"].encode()}, m)
    reg.set_alias("m", "production", 1, expected=None)
    assert reg.verify_audit() == []
    con = sqlite3.connect(tmp_path / "reg.db")
    con.execute("UPDATE registry_aliases SET version=2 WHERE alias='production'")
    con.commit()
    assert any("m@production points at 2" in p for p in reg.verify_audit())
    with pytest.raises(SystemExit) as e:
        main(["audit", "verify", f"db.url=sqlite:///{tmp_path / 'reg.db'}",
              f"storage.uri={tmp_path / 'store'}"])
    assert e.value.code == 9 and "points at 2" in capsys.readouterr().out
    # a database writer who also rewrites the log and recomputes plain SHA-256 hashes (what
    # the chain was before) is caught: the chain is keyed
    con.execute("UPDATE registry_aliases SET version=1 WHERE alias='production'")
    con.execute("UPDATE registry_audit SET to_version=2 WHERE action='alias'")
    import hashlib

    from mlops_ray.registry.audit import AUDIT_FIELDS
    rows = con.execute("SELECT * FROM registry_audit ORDER BY seq").fetchall()
    cols = [c[1] for c in con.execute("PRAGMA table_info(registry_audit)")]
    prev = "0" * 64
    for row in rows:
        r = dict(zip(cols, row))
        r["prev_hash"] = prev
        body = {k: r[k] for k in AUDIT_FIELDS if k != "hash"}
        r["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                              default=str).encode()).hexdigest()
        con.execute("UPDATE registry_audit SET prev_hash=?, hash=? WHERE seq=?",
                    (r["prev_hash"], r["hash"], r["seq"]))
        prev = r["hash"]
    con.execute("UPDATE registry_audit_head SET hash=?", (prev,))
    con.commit()
    assert any("edited" in p for p in reg.verify_audit())


# ---------------------------------------------------------------- the endpoint


def test_a_public_bind_without_keys_is_refused(tmp_path, monkeypatch):
    from mlops_ray.config.compose import job
    from mlops_ray.config.serve import ServeJob
    from mlops_ray.serving import control
    monkeypatch.delenv("MLOPS_RAY_SERVE_API_KEYS", raising=False)

    def serve_job(*overrides: str) -> ServeJob:
        return job("serve", ServeJob, ["ref=m", f"storage.uri={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match="serve.host='0.0.0.0' answers other machines"):
        control.start(serve_job("serve.host=0.0.0.0"))  # refused before Ray starts
    from mlops_ray.serving.auth import check_bind
    check_bind("0.0.0.0", serve_job("serve.auth.allow_anonymous=true").serve.auth)
    # a replica from an exported Serve config (a RayService) refuses to start open, too
    from mlops_ray.serving.core import IngressCore
    exported = control.ingress_config(serve_job("serve.host=0.0.0.0"))
    assert exported["require_keys"] is True
    with pytest.raises(ConfigError, match="refusing to serve anybody"):
        IngressCore({**exported, "api_keys": [], "api_keys_env": "MLOPS_RAY_SERVE_API_KEYS"})
    monkeypatch.setenv("MLOPS_RAY_SERVE_API_KEYS", "k1")
    check_bind("0.0.0.0", serve_job().serve.auth)
    check_bind("127.0.0.1", serve_job().serve.auth)


def test_keys_compare_in_constant_time_and_scopes_are_separate():
    from mlops_ray.serving.auth import key_ok
    assert key_ok("Bearer k-1", {"k-0", "k-1"}) and not key_ok("Bearer k-2", {"k-1"})
    assert not key_ok("Bearer ", {""}) and not key_ok("k-1", {"k-1"})
    import inspect

    from mlops_ray.serving import auth
    assert "compare_digest" in inspect.getsource(auth.key_ok)


def test_error_answers_do_not_grow_with_the_request():
    """A 1.2 MB request of unknown keys used to produce a 20 MB error answer."""
    from mlops_ray.serving.schema import validate_records
    sig = {"inputs": [{"name": f"f{i}", "kind": "numeric", "required": True}
                      for i in range(100)]}
    junk = {f"k{i:06d}" + "x" * 40: "y" * 200 for i in range(4000)}
    records = [junk, *[{"f0": "z" * 10000} for _ in range(500)]]
    request = len(json.dumps({"records": records}))
    with pytest.raises(RequestInvalid) as e:
        validate_records(records, sig, max_rows=1000)
    answer = len(json.dumps({"error": str(e.value), "problems": e.value.problems}))
    assert request > 1_000_000 and answer < 10_000, (request, answer)
    assert len(e.value.problems) == RequestInvalid.MAX
    assert "more problem(s)" in e.value.problems[-2] and "allowed fields" in e.value.problems[-1]


def _request(body: bytes, content_type: str | None = "application/json", chunks: int = 1):
    from starlette.requests import Request
    headers = [(b"content-type", content_type.encode())] if content_type else []
    parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
            for i, p in enumerate(parts)]

    async def receive():
        return msgs.pop(0)
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers,
                    "query_string": b""}, receive)


def test_bodies_are_streamed_to_a_limit_typed_and_not_too_deep():
    from mlops_ray.config.serve import LimitsCfg
    from mlops_ray.serving.core import IngressCore
    core = IngressCore.__new__(IngressCore)  # just the body reader, no routing or metrics
    core.cfg = type("C", (), {"limits": LimitsCfg(max_body_bytes=2048)})()

    def status(req) -> int:
        try:
            asyncio.run(core._body(req))
        except RequestInvalid as e:
            return e.status
        return 200
    assert status(_request(b'{"records": []}')) == 200
    # chunked (no Content-Length): stopped at the limit, not read whole
    assert status(_request(b"[" * 5000, chunks=10)) == 413
    assert status(_request(b'{"records": []}', "text/plain")) == 415
    assert status(_request(b'{"records": []}', None)) == 415
    assert status(_request(b"[" * 1000 + b"]" * 1000)) == 400  # RecursionError: a 400
    assert status(_request(b"{not json")) == 422


# ---------------------------------------------------------------- secrets


def test_records_and_the_jobs_entrypoint_carry_no_secrets():
    from mlops_ray.cluster.submit import entrypoint
    from mlops_ray.config.base import redact
    cfg = {"ray": {"env_vars": {"HF_TOKEN": "hf_secret"}},
           "cluster": {"env_vars": {"WANDB_API_KEY": "wb_secret"}},
           "db": {"url": "postgresql+psycopg://mlops:pg_secret@db:5432/mlops"}}
    text = json.dumps(redact(cfg))
    assert not any(s in text for s in ("hf_secret", "wb_secret", "pg_secret"))
    assert "postgresql+psycopg://mlops:***@db:5432/mlops" in text
    cmd = entrypoint("jobs.train", ["+experiment=adult_mlp", "ray.env_vars.HF_TOKEN=hf_secret",
                                    "db.url=postgresql://mlops:pg_secret@db/mlops",
                                    "cluster.env_vars.X=wb_secret"], "python")
    assert not any(s in cmd for s in ("hf_secret", "wb_secret", "pg_secret"))
    assert "db.url=postgresql://mlops@db/mlops" in cmd


def test_a_remote_job_uploads_the_project_root_without_secret_files():
    from mlops_ray.cluster.submit import project_root
    from mlops_ray.config.base import SECRET_EXCLUDES
    assert (project_root() / "mlops_ray").is_dir()
    for pattern in (".env", "*.pem", ".aws", ".ssh", ".ray", "*.key"):
        assert pattern in SECRET_EXCLUDES


@pytest.mark.ray
@pytest.mark.s3
def test_no_secret_anywhere_in_storage_after_a_tune_on_s3(ray_2_cpus, moto_s3, bucket,
                                                         tmp_path):
    """Keys given the standard way (AWS_* variables): after a tuning study on S3 neither the
    bucket nor the local database holds the secret (tuner.pkl used to pickle it)."""
    import boto3

    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.tune import TuneJob
    from mlops_ray.tune.tuner import run_tuning
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    job = validate(compose("tune", [
        "+experiment=german_mlp", "tracking=none", "train.epochs=1", "tune.num_samples=2",
        "scheduler=fifo", "tune.max_concurrent_trials=1", "storage=s3",
        f"storage.uri=s3://{bucket}/mlops", f"storage.endpoint_url={moto_s3}",
        f"db.url=sqlite:///{tmp_path / 'studies.db'}"]), TuneJob)
    s = run_tuning(job)
    assert s["n_trials"] == 2
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.endswith("tuner.pkl") for k in keys), keys  # Tune did pickle its state
    leaks = [k for k in keys
             if secret.encode() in s3.get_object(Bucket=bucket, Key=k)["Body"].read()]
    assert leaks == []
    assert secret.encode() not in (tmp_path / "studies.db").read_bytes()


@pytest.mark.server
def test_the_study_database_password_is_not_pickled(postgres_server, monkeypatch):
    import pickle

    from optuna.storages import RDBStorage

    from mlops_ray.tune.tuner import pickle_safe_url
    from tests.conftest import new_pg_database
    url = new_pg_database(postgres_server)
    with_pw = url.replace("://postgres@", "://postgres:pg-pass-4711@", 1)  # trust auth ignores it
    assert "pg-pass-4711" in with_pw
    monkeypatch.delenv("PGPASSWORD", raising=False)
    safe = pickle_safe_url(with_pw)
    assert "pg-pass-4711" not in safe and os.environ["PGPASSWORD"] == "pg-pass-4711"
    storage = RDBStorage(safe, heartbeat_interval=None)  # it connects
    assert b"pg-pass-4711" not in pickle.dumps(storage)
