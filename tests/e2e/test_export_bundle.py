"""`python -m jobs.export` as a user runs it, and the bundle's example.py in a fresh virtual
environment that has only onnxruntime and numpy (no torch, no Ray, no repository on the path)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlops_ray.artifacts.predictor import Predictor
from mlops_ray.data import prepare
from mlops_ray.registry import Policy, Registry
from mlops_ray.storage import resolve
from tests.conftest import dataset, run_job
from tests.serving import MODEL, make_version

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A fresh venv (no pip, no site packages) that sees onnxruntime and numpy only: the two
    installed packages are linked into a folder its .pth adds to sys.path (no download)."""
    import onnxruntime
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    only = venv / "only"
    only.mkdir()
    site = Path(np.__file__).resolve().parents[1]
    for name in ("onnxruntime", "numpy", "numpy.libs"):
        if (site / name).exists():
            (only / name).symlink_to(site / name)
    assert Path(onnxruntime.__file__).resolve().parent == site / "onnxruntime"
    (next(venv.glob("lib/python*/site-packages")) / "only.pth").write_text(f"{only}\n")
    return venv / "bin" / "python"


def test_exported_onnx_bundle_runs_in_a_bare_venv_and_matches_serving(tmp_path, bare_venv):
    store = tmp_path / "store"
    store.mkdir()
    reg = Registry(f"sqlite:///{store / 'mlops_ray.db'}", resolve(str(store)), Policy.default())
    prepared = prepare(dataset("adult_mlp"), 0)
    v = make_version(reg, prepared, 3)
    reg.set_alias(MODEL, "production", v.version, expected=None)

    done = run_job(["jobs.export", f"ref={MODEL}@production", "format=onnx",
                    f"storage.uri={store}"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = store / "exports" / f"{MODEL}-v{v.version}-onnx"
    assert f"bundle     file://{bundle}" in done.stdout

    work = tmp_path / "elsewhere"  # outside the repository, nothing of it importable
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    no_torch = subprocess.run([str(bare_venv), "-c", "import torch"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=60)
    assert no_torch.returncode != 0, "the bare venv must not have torch"
    ran = subprocess.run([str(bare_venv), str(bundle / "example.py")], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    printed = [float(p) for p in re.findall(r"^row \d+: probability ([0-9.e-]+) label \d$",
                                            ran.stdout, re.M)]

    rows = json.loads((bundle / "example_rows.json").read_text())["rows"]
    _, folder = reg.fetch(f"{MODEL}@production")
    served, _ = Predictor.load(folder, v.ref).predict_records(rows)
    assert len(printed) == len(rows) == len(served)
    assert any(None in r.values() for r in rows)  # missing values went through the bundle
    assert np.max(np.abs(np.array(printed) - served)) <= 1e-5
