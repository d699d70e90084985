"""`jobs.serve action=export`: a Serve config file pinned to the version a ref names."""
from __future__ import annotations

import pytest
import yaml

from mlops_ray.data import prepare
from mlops_ray.registry import Policy, Registry
from mlops_ray.storage import resolve
from tests.conftest import dataset, in_process
from tests.serving import MODEL, make_version


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("export")
    reg = Registry(f"sqlite:///{store / 'mlops_ray.db'}", resolve(str(store)), Policy.default())
    prepared = prepare(dataset("adult_mlp"), 0)
    v1, v2 = make_version(reg, prepared, 0), make_version(reg, prepared, 1)
    reg.set_alias(MODEL, "production", v2.version, expected=None)
    return store, v1, v2


def export(store, *args) -> int:
    """`python -m jobs.serve action=export ...` in this process: its exit code."""
    from jobs.serve import export as write
    from mlops_ray.config.serve import ServeJob
    from mlops_ray.registry import open_registry
    from mlops_ray.serving.control import export_config

    def run(job: ServeJob) -> None:
        write(job, export_config(job, open_registry(job)))
    return in_process("serve", ServeJob, ["action=export", f"storage.uri={store}", *args], run)


def test_export_pins_the_alias_and_serve_accepts_it(store, tmp_path, capsys):
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema
    root, _, v2 = store
    out = tmp_path / "serve_config.yaml"
    done = export(root, f"ref={MODEL}", f"out={out}", "serve.host=0.0.0.0",
                  "+serve.ingress.autoscaling_config={min_replicas:2,max_replicas:4}")
    assert done == 0, capsys.readouterr().err[-2000:]
    assert f"{MODEL}:{v2.version}" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.parse_obj(cfg)  # what `serve deploy` and KubeRay validate it against
    app = cfg["applications"][0]
    arm = app["deployments"][0]["user_config"]["arms"][0]
    assert (arm["ref"], arm["content_hash"]) == (v2.ref, v2.content_hash)
    assert app["deployments"][0]["autoscaling_config"]["min_replicas"] == 2
    assert cfg["http_options"]["host"] == "0.0.0.0"
    from ray.serve import Application
    assert isinstance(import_attr(app["import_path"])(app["args"]), Application)


def test_export_of_a_missing_alias_fails_and_writes_nothing(store, tmp_path, capsys):
    root, _, _ = store
    out = tmp_path / "c.yaml"
    assert export(root, f"ref={MODEL}@nonexistent", f"out={out}") == 6
    assert "nonexistent: no such alias" in capsys.readouterr().err
    assert not out.exists()
