"""`jobs.serve action=export`: a Serve config file pinned to the version a ref names."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mlops_ray.data import prepare
from mlops_ray.registry import Policy, Registry
from mlops_ray.storage import resolve
from tests.conftest import REPO, dataset, job_env
from tests.serving import MODEL, make_version


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("export")
    reg = Registry(f"sqlite:///{store / 'mlops_ray.db'}", resolve(str(store)), Policy.default())
    prepared = prepare(dataset("adult_mlp"), 0)
    v1, v2 = make_version(reg, prepared, 0), make_version(reg, prepared, 1)
    reg.set_alias(MODEL, "production", v2.version, expected=None)
    return store, v1, v2


def export(store, *args):
    return subprocess.run([sys.executable, "-m", "jobs.serve", "action=export",
                           f"storage.uri={store}", *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def test_export_pins_the_alias_and_serve_accepts_it(store, tmp_path):
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema
    root, _, v2 = store
    out = tmp_path / "serve_config.yaml"
    done = export(root, f"ref={MODEL}", f"out={out}", "serve.host=0.0.0.0",
                  "+serve.ingress.autoscaling_config={min_replicas:2,max_replicas:4}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{MODEL}:{v2.version}" in done.stdout and not list(tmp_path.glob("*.tmp"))
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.parse_obj(cfg)  # what `serve deploy` and KubeRay validate it against
    app = cfg["applications"][0]
    arm = app["deployments"][0]["user_config"]["arms"][0]
    assert (arm["ref"], arm["content_hash"]) == (v2.ref, v2.content_hash)
    assert app["deployments"][0]["autoscaling_config"]["min_replicas"] == 2
    assert cfg["http_options"]["host"] == "0.0.0.0"
    from ray.serve import Application
    assert isinstance(import_attr(app["import_path"])(app["args"]), Application)


def test_export_of_a_missing_alias_fails_and_writes_nothing(store, tmp_path):
    root, _, _ = store
    out = tmp_path / "c.yaml"
    done = export(root, f"ref={MODEL}@nonexistent", f"out={out}")
    assert done.returncode != 0 and "nonexistent" in done.stderr
    assert not out.exists()
