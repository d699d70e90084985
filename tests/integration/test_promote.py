"""jobs.promote and jobs.registry as a user runs them, on the shared local cluster: the default
Adult run becomes version 1 and production; a run that fails a gate is registered but does not
move production; a passing version 3 does, and a rollback returns production to 1. Each step is
in `history` and the audit chain; a PII value planted in the data reaches no artifact or log."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob
from mlops_ray.data import load_table
from mlops_ray.train.driver import run_training
from tests.conftest import run_job

pytestmark = pytest.mark.ray
PLANTED = "jane.roe.4711@example.org"


def train(store: Path, *overrides: str) -> dict:
    cfg = validate(compose("train", ["+experiment=adult_mlp", "tracking=none",
                                     f"storage.uri={store}", *overrides]), TrainJob)
    return run_training(cfg.model_dump(by_alias=True))


def test_promote_gate_rollback_audit_and_pii(ray_2_cpus, tmp_path):
    store = tmp_path / "store"
    common = [f"storage.uri={store}", f"ray.address={ray_2_cpus}", "tracking=none"]
    quick = ["cv.folds=2", "cv.epochs=1", "promote.model=adult_mlp"]

    def promote(run: dict, *extra: str):
        return run_job(["jobs.promote", "+experiment=adult_mlp", f"run={run['run_uri']}",
                        *common, *quick, *extra], timeout=600)

    def registry(*args: str):
        return run_job(["jobs.registry", *args, f"storage.uri={store}"], timeout=60)

    # 1. the default experiment (fewer epochs) passes every gate: version 1, production -> 1
    a = train(store, "train.epochs=3")
    out = promote(a)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "production None -> 1" in out.stdout and "PASS (6/6" in out.stdout

    # 2. a weak model trained on data with a PII column: registered as 2, gates fail, exit 5
    df = load_table("builtin://adult")
    df["email"] = PLANTED
    pii_data = tmp_path / "adult_pii.parquet"
    df.to_parquet(pii_data)
    weak = run_job(["jobs.train", "+experiment=adult_mlp", *common, f"dataset.uri={pii_data}",
                    "dataset.pii=[email]", "train.epochs=1", "optim.lr=0.00003",
                    "model.hidden=[8]"], timeout=600)
    assert weak.returncode == 0, weak.stderr[-3000:]
    b_uri = next(line.split()[-1] for line in weak.stdout.splitlines()
                 if line.startswith("run record"))
    out_b = promote({"run_uri": b_uri.removesuffix("/run.json")}, f"dataset.uri={pii_data}",
                    "dataset.pii=[email]")
    assert out_b.returncode == 5, out_b.stdout[-2000:] + out_b.stderr[-2000:]
    assert "champion" in out_b.stderr and "production stays at 1" in out_b.stderr

    # 3. the same config under another name trains the same model: passes against v1 -> 3
    c = train(store, "train.epochs=3", "name=adult_mlp_again")
    out_c = promote(c)
    assert out_c.returncode == 0, out_c.stderr[-3000:]
    assert "production 1 -> 3" in out_c.stdout

    shown = json.loads(registry("--json", "show", "adult_mlp").stdout)
    assert shown["aliases"] == {"challenger": 3, "production": 3}
    vs = {v["version"]: v for v in shown["versions"]}
    assert [vs[i]["gate_passed"] for i in (1, 2, 3)] == [True, False, True]
    assert vs[3]["champion_run"] == a["run_uri"] and vs[2]["champion_run"] == a["run_uri"]
    assert vs[1]["data_version"] == a["dataset"]["version"]
    assert vs[1]["config_hash"] == a["config_hash"] and vs[1]["code_version"]["package"]
    lineage = json.loads(registry("--json", "lineage", "--dataset-version",
                                  a["dataset"]["version"]).stdout)
    assert {v["version"] for v in lineage} >= {1, 3}

    # 4. rollback: production back to 1, every step in history, the chain verifies
    rb = registry("rollback", "adult_mlp@production", "--reason", "p99 regression")
    assert rb.returncode == 0 and "3 -> 1" in rb.stdout, rb.stderr
    hist = json.loads(registry("--json", "history", "adult_mlp").stdout)
    prod = [(h["action"], h["outcome"], h["from_version"], h["to_version"])
            for h in hist if h["alias"] == "production"]
    assert prod == [("alias", "ok", None, 1), ("move_production", "denied", None, 2),
                    ("alias", "ok", 1, 3), ("rollback", "ok", 3, 1)]
    assert registry("audit", "verify").returncode == 0
    con = sqlite3.connect(store / "mlops_ray.db")
    con.execute("UPDATE registry_audit SET to_version=2 WHERE action='rollback'")
    con.commit()
    broken = registry("audit", "verify")
    assert broken.returncode == 9 and "edited" in broken.stdout

    # 5. privacy: the planted PII value is in no registered file, run file or log
    v2 = Path(vs[2]["artifact_uri"].removeprefix("file://"))
    files = [p for p in v2.iterdir()] + [p for p in Path(b_uri.removeprefix("file://")).parent
                                         .rglob("*") if p.is_file()]
    assert any(p.name == "reference.json" for p in files)
    for p in files:
        assert PLANTED.encode() not in p.read_bytes(), p
    for text in (weak.stdout, weak.stderr, out_b.stdout, out_b.stderr):
        assert PLANTED not in text
    sig = json.loads((v2 / "signature.json").read_text())
    assert "email" not in json.dumps(sig) and sig["threshold"] > 0
