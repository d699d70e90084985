"""Offline export (no Ray): ONNX and TorchScript bundles answer like the served model on held-out
Adult rows (missing values and unseen categories included), bundles are complete and hashed,
and bad requests or a disagreeing bundle write nothing."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mlops_ray.artifacts.predictor import Predictor
from mlops_ray.data import prepare
from mlops_ray.export import (
    MODEL_FILE,
    TOLERANCE,
    ExportError,
    build_bundle,
    lineage_of,
    verify_bundle,
    write_bundle,
)
from mlops_ray.registry import Policy, Registry
from mlops_ray.storage import resolve
from tests.conftest import dataset, in_process
from tests.serving import MODEL, make_version


@pytest.fixture(scope="module")
def adult():
    prepared = prepare(dataset("adult_mlp"), 0)
    # held-out rows: the test split, with values Serve must also handle (missing, unseen)
    held = prepared.frame.iloc[prepared.splits["test"]].sample(300, random_state=0).copy()
    held = held.drop(columns=[prepared.label]).reset_index(drop=True)
    held.loc[0:9, "age"] = np.nan
    held.loc[5:14, "hours_per_week"] = np.nan
    held.loc[10:19, "workclass"] = "Space-force"          # never seen in training
    held.loc[20:29, "native_country"] = None
    held.loc[30:39, "occupation"] = ""
    return prepared, held


@pytest.fixture(scope="module")
def store(tmp_path_factory, adult):
    root = tmp_path_factory.mktemp("export")
    reg = Registry(f"sqlite:///{root / 'mlops_ray.db'}", resolve(str(root)), Policy.default())
    v1 = make_version(reg, adult[0], 0)
    reg.set_alias(MODEL, "production", v1.version, expected=None)
    version, folder = reg.fetch(f"{MODEL}@production")
    return root, reg, version, folder


def listing(root):
    """Every file and folder under the store's exports/ (hidden temporaries included)."""
    return sorted(str(p.relative_to(root)) for p in (root / "exports").rglob("*")) \
        if (root / "exports").exists() else []


def served_answers(folder, version, held):
    served = Predictor.load(folder, version.ref)
    p_frame = served.predict_proba(held)
    records = held.astype(object).where(held.notna(), None).to_dict("records")
    p_records, labels = served.predict_records(records)
    np.testing.assert_allclose(p_frame, p_records, atol=1e-7)  # both served paths agree
    return p_records, labels, records


def test_held_out_rows_cover_missing_and_unseen(adult):
    _, held = adult
    pre = adult[0].preprocessor
    assert held["age"].isna().sum() == 10 and held["native_country"].isna().sum() >= 10
    assert (~held["workclass"].isin(pre.categories["workclass"] + [None])).sum() >= 10


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bundle_matches_the_served_model_on_held_out_rows(store, adult, tmp_path, fmt):
    _, _, version, folder = store
    _, held = adult
    bundle = build_bundle(folder, lineage_of(version), fmt, check_rows=held)
    out = tmp_path / "bundle"
    write_bundle(bundle, resolve(str(out)))
    p_served, y_served, records = served_answers(folder, version, held)

    model_bytes = (out / MODEL_FILE[fmt]).read_bytes()
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        from mlops_ray.export.onnx_graph import feeds
        onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        assert {i.name: i.type for i in session.get_inputs()}["workclass"] == "tensor(string)"
        p, y = session.run(["probability", "label"], feeds(session.get_inputs(), records))
    else:
        import torch

        from mlops_ray.export.torchscript import inputs
        module = torch.jit.load(io.BytesIO(model_bytes))
        p, y = (t.numpy() for t in module(*inputs(module, records)))
    assert np.max(np.abs(np.asarray(p, np.float64) - p_served)) <= TOLERANCE
    assert (np.asarray(y) == y_served).all()
    assert 0 < y_served.sum() < len(y_served)  # both labels occur: the threshold is exercised
    assert bundle.manifest["parity"]["rows"] >= len(held)  # the export checked them as well


@pytest.mark.parametrize("family", ["xgboost", "lightgbm"])
def test_a_tree_version_exports_to_onnx_with_parity_and_refuses_torchscript(
        tmp_path, adult, family):
    """A booster's bundle is onnxmltools' tree ensemble behind the same preprocessing graph;
    it answers like the served booster on held-out rows (missing and unseen values too), and
    TorchScript, which cannot hold a booster, is a clear error that writes nothing."""
    prepared, held = adult
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", resolve(str(tmp_path)), Policy.default())
    v = make_version(reg, prepared, 0, family=family)
    version, folder = reg.fetch(v.ref)
    bundle = build_bundle(folder, lineage_of(version), "onnx", check_rows=held)
    p_served, y_served, records = served_answers(folder, version, held)
    import onnxruntime as ort

    from mlops_ray.export.onnx_graph import feeds
    session = ort.InferenceSession(bundle.files[MODEL_FILE["onnx"]],
                                   providers=["CPUExecutionProvider"])
    p, y = session.run(["probability", "label"], feeds(session.get_inputs(), records))
    assert np.max(np.abs(np.asarray(p, np.float64) - p_served)) <= TOLERANCE
    assert (np.asarray(y) == y_served).all() and 0 < y_served.sum() < len(y_served)
    assert bundle.manifest["parity"]["rows"] >= len(held)
    with pytest.raises(ExportError, match=f"a {family} model is a booster.*format=onnx"):
        build_bundle(folder, lineage_of(version), "torchscript")


def test_bundle_is_complete_hashed_and_traceable(store, tmp_path):
    _, _, version, folder = store
    out = tmp_path / "b"
    write_bundle(build_bundle(folder, lineage_of(version), "onnx"), resolve(str(out)))
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "MANIFEST.json", "README.md", "example.py", "example_rows.json", "model.onnx",
        "model_card.md", "preprocessor.json", "signature.json"])
    man = verify_bundle(out)
    assert man["lineage"]["content_hash"] == version.content_hash
    assert man["lineage"]["ref"] == version.ref and man["lineage"]["run"] == version.run_uri
    assert man["lineage"]["data_version"] == version.data_version
    assert json.loads((out / "signature.json").read_text())["threshold"] == 0.5
    rows = json.loads((out / "example_rows.json").read_text())
    assert rows["rows"][-2] == {k: None for k in rows["rows"][-2]}  # the all-missing row
    assert len(rows["expected"]["probability"]) == len(rows["rows"])
    example = (out / "example.py").read_text()
    assert "import torch" not in example and "mlops_ray" not in example
    assert len(example.splitlines()) <= 40
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"x")
    with pytest.raises(ExportError, match="model.onnx does not match"):
        verify_bundle(out)


def test_a_bundle_that_disagrees_is_refused_and_nothing_written(store, monkeypatch, capsys):
    root, _, version, _ = store
    from mlops_ray.export import onnx_graph
    real = onnx_graph.build

    def skewed(model, pre, threshold, **kw):  # a graph whose scaling drifted from training
        bad = type(pre).from_dict({**pre.to_dict(), "means": {
            c: m + 1.0 for c, m in pre.means.items()}})
        return real(model, bad, threshold, **kw)
    monkeypatch.setattr(onnx_graph, "build", skewed)
    before = listing(root)
    assert export_job([f"ref={MODEL}@production", f"storage.uri={root}"]) == \
        ExportError.exit_code
    err = capsys.readouterr().err
    assert "does not match the served model" in err and "nothing written" in err
    assert listing(root) == before


@pytest.mark.parametrize("args, code, expected", [
    (["format=tflite"], 2, "format='tflite': Input should be 'onnx' or 'torchscript'"),
    ([f"ref={MODEL}:99"], 6, f"{MODEL}:99 is not registered"),
    ([f"ref={MODEL}@canary"], 6, f"{MODEL}@canary: no such alias"),
    ([f"ref={MODEL}:latest"], 2, "expected a registry ref"),
    ([], 2, "ref: required key is missing"),
])
def test_bad_format_or_version_is_a_clear_error_and_writes_nothing(store, capsys, args, code,
                                                                    expected):
    root = store[0]
    base = [] if any(a.startswith("ref=") for a in args) or not args else [f"ref={MODEL}"]
    before = listing(root)
    assert export_job([*base, *args, f"storage.uri={root}"]) == code
    assert expected in capsys.readouterr().err
    assert listing(root) == before


def export_job(overrides: list[str]) -> int:
    """jobs.export in this process: its exit code."""
    from mlops_ray.config.batch import ExportJob
    from mlops_ray.export import export
    return in_process("export", ExportJob, overrides, lambda job: export(job))


def test_job_writes_the_default_folder_and_audits_the_export(store, capsys):
    root, reg, version, _ = store
    assert export_job([f"ref={MODEL}", "format=torchscript", f"storage.uri={root}"]) == 0
    out = root / "exports" / f"{MODEL}-v{version.version}-torchscript"
    assert verify_bundle(out)["format"] == "torchscript"
    assert str(out) in capsys.readouterr().out
    last = reg.audit_log(MODEL)[-1]
    assert (last["action"], last["version"]) == ("export", version.version)
    assert json.loads(last["details"])["format"] == "torchscript"
