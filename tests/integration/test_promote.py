"""jobs.promote and jobs.registry as a user runs them, on the shared local cluster: an Adult
run becomes version 1 and production; a run that fails a gate is registered but does not move
production (the job exits 5); a passing version 3 does, and a rollback returns production to 1.
Each step is in `history` and the audit chain; a PII value planted in the data reaches no
artifact or log.

Promotion runs in this process with the CI profile; the two entry points whose exit codes a
user sees (jobs.promote refusing, jobs.registry finding the chain broken) run as subprocesses."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mlops_ray.config.compose import job
from mlops_ray.config.pipeline import PipelineJob
from mlops_ray.data import load_table
from mlops_ray.pipeline.promote import promote
from mlops_ray.train.driver import run_training
from tests.conftest import PROFILE, copy_run, run_job

pytestmark = pytest.mark.ray
PLANTED = "jane.roe.4711@example.org"


def registry(store: Path, capsys, *args: str) -> tuple[int, str]:
    """`python -m jobs.registry ...` in this process: (exit code, stdout)."""
    from jobs.registry import main
    capsys.readouterr()  # drop what the stages before printed
    with pytest.raises(SystemExit) as e:
        main([*args, f"storage.uri={store}"])
    return int(e.value.code or 0), capsys.readouterr().out


def test_promote_gate_rollback_audit_and_pii(ray_2_cpus, adult_run, tmp_path, capsys):
    store = tmp_path / "store"
    common = [*PROFILE, f"storage.uri={store}", "promote.model=adult_mlp"]

    def pipeline(*extra: str) -> PipelineJob:
        return job("pipeline", PipelineJob, [*common, *extra])

    def promoted(rec: dict, *extra: str) -> dict:
        p = pipeline(*extra)
        return promote(p.promote_job(rec["run_uri"]), log=lambda _: None)

    # 1. the default experiment (CI profile: the session's run) passes every gate: version 1
    a = copy_run(adult_run, store)
    out = promoted(a)
    assert (out["version"], out["production_before"], out["production"]) == (1, None, 1)
    assert out["passed"] and "PASS (6/6" in out["table"]

    # 2. a weak model trained on data with a PII column: registered as 2, gates fail, exit 5
    df = load_table("builtin://adult")
    df["email"] = PLANTED
    pii_data = tmp_path / "adult_pii.parquet"
    df.to_parquet(pii_data)
    weak_args = [f"dataset.uri={pii_data}", "dataset.pii=[email]", "train.epochs=1",
                 "optim.lr=0.00003", "model.hidden=[8]"]
    b = run_training(pipeline(*weak_args).train_job())
    out_b = run_job(["jobs.promote", "+experiment=adult_mlp", f"run={b['run_uri']}",
                     f"storage.uri={store}", f"ray.address={ray_2_cpus}", "tracking=none",
                     "cv.folds=2", "cv.epochs=1", "n_boot=50", "fairness.n_boot=50",
                     "promote.model=adult_mlp", *weak_args[:2]], timeout=600)
    assert out_b.returncode == 5, out_b.stdout[-2000:] + out_b.stderr[-2000:]
    assert "champion" in out_b.stderr and "production stays at 1" in out_b.stderr

    # 3. the same model again under another run name: passes against v1 -> 3
    c = copy_run(adult_run, store, name="adult_mlp_again")
    out_c = promoted(c)
    assert (out_c["version"], out_c["production_before"], out_c["production"]) == (3, 1, 3)

    code, text = registry(store, capsys, "--json", "show", "adult_mlp")
    shown = json.loads(text)
    assert shown["aliases"] == {"challenger": 3, "production": 3}
    vs = {v["version"]: v for v in shown["versions"]}
    assert [vs[i]["gate_passed"] for i in (1, 2, 3)] == [True, False, True]
    assert vs[3]["champion_run"] == a["run_uri"] and vs[2]["champion_run"] == a["run_uri"]
    assert vs[1]["data_version"] == a["dataset"]["version"]
    assert vs[1]["config_hash"] == a["config_hash"] and vs[1]["code_version"]["package"]
    code, text = registry(store, capsys, "--json", "lineage", "--dataset-version",
                          a["dataset"]["version"])
    assert {v["version"] for v in json.loads(text)} >= {1, 3}

    # 4. rollback: production back to 1, every step in history, the chain verifies
    code, text = registry(store, capsys, "rollback", "adult_mlp@production", "--reason",
                          "p99 regression")
    assert code == 0 and "3 -> 1" in text
    hist = json.loads(registry(store, capsys, "--json", "history", "adult_mlp")[1])
    prod = [(h["action"], h["outcome"], h["from_version"], h["to_version"])
            for h in hist if h["alias"] == "production"]
    assert prod == [("alias", "ok", None, 1), ("move_production", "denied", None, 2),
                    ("alias", "ok", 1, 3), ("rollback", "ok", 3, 1)]
    assert registry(store, capsys, "audit", "verify")[0] == 0
    con = sqlite3.connect(store / "mlops_ray.db")
    con.execute("UPDATE registry_audit SET to_version=2 WHERE action='rollback'")
    con.commit()
    broken = run_job(["jobs.registry", "audit", "verify", f"storage.uri={store}"], timeout=60)
    assert broken.returncode == 9 and "edited" in broken.stdout

    # 5. privacy: the planted PII value is in no registered file, run file or log
    v2 = Path(vs[2]["artifact_uri"].removeprefix("file://"))
    files = [p for p in v2.iterdir()] + [p for p in Path(b["run_uri"].removeprefix("file://"))
                                         .rglob("*") if p.is_file()]
    assert any(p.name == "reference.json" for p in files)
    for p in files:
        assert PLANTED.encode() not in p.read_bytes(), p
    for text in (out_b.stdout, out_b.stderr):
        assert PLANTED not in text
    import ray
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for p in logs.rglob("*"):  # the training's driver and workers logged here
        if p.is_file():
            assert PLANTED.encode() not in p.read_bytes(), p
    sig = json.loads((v2 / "signature.json").read_text())
    assert "email" not in json.dumps(sig) and sig["threshold"] > 0
