"""The registry on real databases (SQLite file; PostgreSQL started by the test session when its
server is installed): immutable versions, compare-and-swap aliases under 20 racing processes,
gates and roles on production, rollback, lineage and erasure, the audit chain, artifact hashes."""
from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from mlops_ray.errors import ArtifactCorrupted, PermissionDenied, RegistryConflict, RegistryError
from mlops_ray.registry import ANY, Policy, Registry
from mlops_ray.registry import schema as S
from mlops_ray.registry.policy import TOKEN_ENV, token_hash
from mlops_ray.storage import resolve
from tests.conftest import new_pg_database

TOKENS = {"viewer": "tok-v", "trainer": "tok-t", "approver": "tok-p", "admin": "tok-a"}
POLICY = Policy({"admin": ["ada"], "approver": ["pat"], "trainer": ["tim"], "viewer": ["*"]},
                {token_hash(t): {"viewer": "vic", "trainer": "tim", "approver": "pat",
                                 "admin": "ada"}[r] for r, t in TOKENS.items()}, "test policy")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def db(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"  # its key: a file next to it
    # a server database takes its key from the environment (registry/signing.py)
    monkeypatch.setenv("MLOPS_RAY_REGISTRY_KEY", "test-registry-key")
    return new_pg_database(request.getfixturevalue("postgres_server"))


def open_as(db: str, store: Path, who: str = "ada") -> Registry:
    return Registry(db, resolve(str(store)), POLICY, actor=who)


def meta(run: str, passed: bool = True, champion: str | None = None, data: str = "d1") -> dict:
    return {"run_uri": run, "run_name": run, "gate_passed": passed, "champion_run": champion,
            "data_version": data, "config_hash": f"c-{run}", "metrics": {"test/auc": 0.9}}


MODEL_META = json.dumps({"model": {"_target_": "mlops_ray.models.mlp.MLP", "hidden": [8]},
                         "in_features": 3}).encode()


def register(r: Registry, model: str, files: dict[str, bytes], m: dict):
    """What promote registers: the files, a meta.json naming an allowed builder, and a gate
    report signed with the registry's key carrying the verdict `m` describes."""
    from mlops_ray.registry.signing import sign
    report = sign({"passed": m["gate_passed"],
                   "lineage": {"run": m["run_uri"], "data_version": m["data_version"],
                               "config_hash": m["config_hash"]},
                   "champion": {"run": m["champion_run"]} if m["champion_run"] else None},
                  r.key)
    return r.register(model, {"meta.json": MODEL_META, **files,
                              "gate_report.json": json.dumps(report).encode()}, m)


def test_versions_immutable_numbered_per_model(db, tmp_path):
    r = open_as(db, tmp_path)
    v1 = register(r, "adult", {"model.pt": b"w1"}, meta("r1"))
    v2 = register(r, "adult", {"model.pt": b"w2"}, meta("r2"))
    g1 = register(r, "german", {"model.pt": b"w1"}, meta("r3"))
    assert (v1.version, v2.version, g1.version) == (1, 2, 1)
    n_audit = len(r.audit_log())
    again = register(r, "adult", {"model.pt": b"w1"}, meta("r1"))  # same content: same version
    assert again.version == 1 and len(r.audit_log()) == n_audit
    assert r.get("adult").version == 2 and r.get("adult:1").content_hash == v1.content_hash
    with pytest.raises(RegistryError, match="adult:7 is not registered"):
        r.get("adult:7")
    with pytest.raises(RegistryError, match="no such alias"):
        r.get("adult@production")
    with pytest.raises(RegistryError, match=r"no model 'adulte' is registered \(did you mean "
                                            r"'adult'\?\); models: \['adult', 'german'\]"):
        r.get("adulte@production")
    with pytest.raises(RegistryError, match="model name"):
        register(r, "bad name!", {"model.pt": b"x"}, meta("r"))


def test_production_needs_gates_roles_and_champion(db, tmp_path):
    r = open_as(db, tmp_path)
    register(r, "m", {"f": b"1"}, meta("r1"))
    register(r, "m", {"f": b"2"}, meta("r2", passed=False, champion="r1"))
    register(r, "m", {"f": b"3"}, meta("r3", champion="r-other"))
    register(r, "m", {"f": b"4"}, meta("r4", champion="r1"))
    r.set_alias("m", "production", 1, expected=None)
    with pytest.raises(PermissionDenied, match="failed its validation gates"):
        r.set_alias("m", "production", 2, expected=1)
    with pytest.raises(PermissionDenied, match="champion gate compared against r-other"):
        r.set_alias("m", "production", 3, expected=1)
    with pytest.raises(PermissionDenied, match="needs the approver role"):
        open_as(db, tmp_path, "tim").set_alias("m", "production", 4, expected=1)
    open_as(db, tmp_path, "tim").set_alias("m", "challenger", 4)  # trainers move other aliases
    with pytest.raises(PermissionDenied, match="needs the admin role"):
        open_as(db, tmp_path, "pat").set_alias("m", "production", 2, force=True, reason="x")
    with pytest.raises(PermissionDenied, match="needs a --reason"):
        r.set_alias("m", "production", 2, force=True, reason=" ")
    assert r.get("m@production").version == 1
    open_as(db, tmp_path, "pat").set_alias("m", "production", 4, expected=1)
    r.set_alias("m", "production", 2, expected=4, force=True, reason="hotfix, ticket 7")
    assert r.get("m@production").version == 2
    log = r.audit_log("m")
    denied = [a for a in log if a["outcome"] == "denied"]
    assert len(denied) == 5 and {a["actor"] for a in denied} == {"ada", "tim", "pat"}
    assert all(json.loads(a["details"])["denied"] for a in denied)
    forced = [a for a in log if a["action"] == "force_alias"]
    assert forced[0]["reason"] == "hotfix, ticket 7" and forced[0]["verdict"] == "failed"
    with pytest.raises(PermissionDenied, match="needs the trainer role"):
        register(open_as(db, tmp_path, "vic"), "m", {"f": b"5"}, meta("r5"))
    assert r.verify_audit() == []


def test_compare_and_swap_refuses_a_stale_expectation(db, tmp_path):
    r = open_as(db, tmp_path)
    for i in (1, 2, 3):
        register(r, "m", {"f": str(i).encode()}, meta(f"r{i}"))
    r.set_alias("m", "canary", 1, expected=None)
    before = len(r.audit_log())
    with pytest.raises(RegistryConflict, match="expected None, it now points at 1"):
        r.set_alias("m", "canary", 2, expected=None)
    assert r.get("m@canary").version == 1 and len(r.audit_log()) == before
    r.set_alias("m", "canary", 3, expected=1)
    r.set_alias("m", "canary", 2, expected=ANY)
    assert r.get("m@canary").version == 2


def _racer(db: str, store: str, i: int, barrier, results) -> None:
    r = open_as(db, Path(store), "pat")
    v = register(r, "race", {"f": f"proc-{i}".encode()}, meta(f"run-{i}", champion=None))
    for rnd in range(2):
        barrier.wait()
        expected = r.aliases("race").get("production")
        barrier.wait()  # everybody read the same value; now all try to swap it
        try:
            r.set_alias("race", "production", v.version, expected=expected)
            results.put((rnd, i, v.version, "won"))
        except RegistryConflict:
            results.put((rnd, i, v.version, "conflict"))
        except PermissionDenied:  # round 2: champion gate compared against nothing
            results.put((rnd, i, v.version, "denied"))
        barrier.wait()
    r.close()


@pytest.mark.slow  # 20 processes
@pytest.mark.timeout(300)
def test_twenty_concurrent_promoters(db, tmp_path):
    """20 processes register and race for `production` from the same expected value."""
    n = 20
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    open_as(db, tmp_path).close()  # schema created once before the race (racers also migrate)
    procs = [ctx.Process(target=_racer, args=(db, str(tmp_path), i, barrier, results))
             for i in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in range(2 * n)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    r = open_as(db, tmp_path)
    versions = sorted(v.version for v in r.versions("race"))
    assert versions == list(range(1, n + 1))  # none lost, none duplicated
    first = [o for o in out if o[0] == 0]
    winners = [o for o in first if o[3] == "won"]
    assert len(winners) == 1 and sum(o[3] == "conflict" for o in first) == n - 1
    # round 2: every candidate's champion gate compared against nothing, so production (set
    # in round 1) refuses all of them except the winner itself, which already holds it
    second = [o for o in out if o[0] == 1]
    assert sum(o[3] == "won" for o in second) <= 1
    assert r.get("race@production").version == winners[0][2]
    assert r.verify_audit() == []
    moves = [a for a in r.audit_log("race") if a["action"] == "alias" and a["outcome"] == "ok"]
    assert len(moves) == 1 + sum(o[3] == "won" for o in second)


def test_rollback_follows_the_promotion_stack(db, tmp_path):
    r = open_as(db, tmp_path)
    register(r, "m", {"f": b"1"}, meta("r1"))
    register(r, "m", {"f": b"2"}, meta("r2", passed=False, champion="r1"))
    register(r, "m", {"f": b"3"}, meta("r3", champion="r1"))
    with pytest.raises(RegistryError, match="no earlier version"):
        r.rollback("m", "production", "nothing yet")
    r.set_alias("m", "production", 1, expected=None)
    with pytest.raises(PermissionDenied):
        r.set_alias("m", "production", 2, expected=1)
    r.set_alias("m", "production", 3, expected=1)
    assert r.rollback("m", "production", "p99 regression") == (3, 1)
    assert r.get("m@production").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        r.rollback("m", "production", "again")
    with pytest.raises(PermissionDenied, match="approver"):
        open_as(db, tmp_path, "tim").rollback("m", "production", "x")
    hist = [(a["action"], a["outcome"], a["from_version"], a["to_version"])
            for a in r.audit_log("m") if a["alias"] == "production"]
    assert hist == [("alias", "ok", None, 1), ("move_production", "denied", None, 2),
                    ("alias", "ok", 1, 3), ("rollback", "ok", 3, 1),
                    ("rollback_production", "denied", None, None)]


def test_delete_and_erasure(db, tmp_path):
    r = open_as(db, tmp_path)
    a = register(r, "m", {"f": b"1"}, meta("r1", data="old-data"))
    register(r, "m", {"f": b"2"}, meta("r2", data="old-data"))
    register(r, "m", {"f": b"3"}, meta("r3", data="new-data"))
    register(r, "g", {"f": b"1"}, meta("r9", data="old-data"))
    r.set_alias("m", "production", 1, expected=None)
    assert [v.ref for v in r.lineage(data_version="old")] == ["g:1", "m:1", "m:2"]
    with pytest.raises(PermissionDenied, match="still aliased"):
        r.delete("m", 1, "cleanup")
    with pytest.raises(PermissionDenied, match="admin"):
        open_as(db, tmp_path, "pat").delete("m", 2, "cleanup")
    r.delete("m", 2, "cleanup")
    assert r.get("m:2").status == "deleted"
    with pytest.raises(RegistryError, match="deleted"):
        r.fetch("m:2")
    marked = open_as(db, tmp_path, "pat").mark_retrain("old-data", "erasure request 12")
    assert [v.ref for v in marked] == ["g:1", "m:1"]
    assert r.get("m:3").status == "active" and r.get("m:1").status == "retrain_requested"
    r.fetch("m:1")  # still servable until retrained
    assert Path(a.artifact_uri.removeprefix("file://")).exists()
    acts = [(x["action"], x["outcome"]) for x in r.audit_log()]
    assert ("delete", "denied") in acts and ("delete", "ok") in acts
    assert acts.count(("mark_retrain", "ok")) == 2


def test_audit_chain_detects_edits_and_deletions(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    r = open_as(db, tmp_path)
    for i in (1, 2, 3):
        register(r, "m", {"f": str(i).encode()}, meta(f"r{i}"))
    r.set_alias("m", "production", 1, expected=None)
    assert r.verify_audit() == []
    out = tmp_path / "audit.jsonl"
    assert r.export_audit(out) == 5  # the policy installed, 3 versions, 1 alias
    assert r.verify_audit([json.loads(x) for x in out.read_text().splitlines()]) == []
    lines = out.read_text().splitlines()
    lines[2] = lines[2].replace('"register"', '"delete"')
    assert any("seq=3" in p for p in r.verify_audit([json.loads(x) for x in lines]))
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("UPDATE registry_audit SET reason='nothing to see' WHERE seq=3")
    con.commit()
    assert r.verify_audit() == ["record seq=3: content does not match its hash (edited)"]
    con.execute("UPDATE registry_audit SET reason=NULL WHERE seq=3")
    con.commit()
    assert r.verify_audit() == []
    con.execute("DELETE FROM registry_audit WHERE seq=5")  # the newest record
    con.commit()
    assert any("removed from the end" in p for p in r.verify_audit())
    con.execute("DELETE FROM registry_audit WHERE seq=3")
    con.commit()
    probs = r.verify_audit()
    assert any("sequence number" in p for p in probs) and any("chain broken" in p for p in probs)


def test_tampered_artifact_is_refused(tmp_path):
    r = open_as(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    v = register(r, "m", {"model.pt": b"weights", "signature.json": b"{}"}, meta("r1"))
    _, folder = r.fetch("m:1")
    (folder / "model.pt").write_bytes(b"weightz")
    with pytest.raises(ArtifactCorrupted, match="'model.pt' was altered"):
        r.fetch("m:1")
    (folder / "model.pt").write_bytes(b"weights")
    r.fetch("m:1")  # restored: accepted again
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactCorrupted, match="unexpected: \\['extra.bin'\\]"):
        r.fetch("m:1")
    (folder / "extra.bin").unlink()
    man = json.loads((folder / "MANIFEST.json").read_text())
    man["files"]["model.pt"]["size"] = 1
    (folder / "MANIFEST.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactCorrupted, match="edited manifest"):
        r.fetch(v.ref)


def test_migrations_are_versioned(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    open_as(db, tmp_path).close()
    con = sqlite3.connect(tmp_path / "r.db")
    assert con.execute("SELECT version FROM registry_schema").fetchall() == [(S.LATEST,)]
    con.execute("UPDATE registry_schema SET version=999")
    con.commit()
    with pytest.raises(RegistryError, match="schema version 999, newer than this code"):
        open_as(db, tmp_path)


@pytest.mark.s3
def test_registry_on_s3(tmp_path, moto_s3, bucket):
    store = resolve(f"s3://{bucket}/models", endpoint_url=moto_s3)
    r = Registry(f"sqlite:///{tmp_path / 'r.db'}", store, POLICY, actor="ada")
    v = register(r, "m", {"model.pt": b"w" * 1000}, meta("r1"))
    assert v.artifact_uri.startswith(f"s3://{bucket}/models/registry/m/")
    ver, folder = r.fetch("m:1")
    assert (folder / "model.pt").read_bytes() == b"w" * 1000


def test_cli_identity_denials_and_audit(tmp_path, monkeypatch, capsys):
    """jobs.registry as users run it (its main, in this process): token identities from a
    policy file, exit codes."""
    from jobs.registry import main
    policy = tmp_path / "policy.yaml"
    policy.write_text("roles: {admin: [ada], approver: [pat], viewer: ['*']}\n"
                      f"tokens: {{{token_hash('tok-p')}: pat, {token_hash('tok-v')}: vic}}\n")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    r = Registry(db, resolve(str(tmp_path)), Policy.load(str(policy)), actor="ada")
    register(r, "m", {"f": b"1"}, meta("r1"))
    register(r, "m", {"f": b"2"}, meta("r2", passed=False, champion="r1"))
    r.set_alias("m", "production", 1, expected=None)
    common = [f"db.url={db}", f"storage.uri={tmp_path}", f"registry.policy={policy}"]

    def cli(*args: str, token: str) -> tuple[int, str, str]:
        monkeypatch.setenv(TOKEN_ENV, token)
        with pytest.raises(SystemExit) as e:
            main([*args, *common])
        out = capsys.readouterr()
        return int(e.value.code or 0), out.out, out.err
    code, out, err = cli("whoami", token="tok-p")
    assert code == 0 and "pat (role: approver" in out
    code, out, err = cli("approve", "m:2", "--reason", "looks fine", token="tok-p")
    assert code == 7 and "failed its validation gates" in err
    code, out, err = cli("rollback", "m@production", "--reason", "x", token="tok-v")
    assert code == 7 and "'vic' (role: viewer" in err
    code, out, err = cli("whoami", token="forged")
    assert code == 7 and "not in the registry policy" in err
    code, out, err = cli("show", "m", token="tok-v")
    assert code == 0 and "m:1" in out and "production" in out
    code, out, err = cli("--json", "history", "m", token="tok-v")
    acts = [(a["actor"], a["action"], a["outcome"]) for a in json.loads(out)]
    assert ("pat", "move_production", "denied") in acts and ("vic", "rollback_production",
                                                            "denied") in acts
    assert cli("audit", "verify", token="tok-v")[0] == 0
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("UPDATE registry_audit SET actor='mallory' WHERE seq=1")
    con.commit()
    code, out, err = cli("audit", "verify", token="tok-v")
    assert code == 9 and "seq=1" in out
    code, out, err = cli("show", "m:9", token="tok-v")
    assert code == 6 and "m:9 is not registered" in err
