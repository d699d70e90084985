"""Build, verify and write the offline bundle of one registry version (no Ray, no Hydra).

A bundle is the model file (ONNX with the preprocessing folded in, or TorchScript), the version's
signature, preprocessor and model card, example rows with the served model's answers, an
example script that needs only the format's runtime, a README and a MANIFEST.json (SHA-256 of
every file, lineage). Before anything is written, the model file is run against the served
model (`Predictor`, what the Serve replicas run) on a few hundred rows, missing values and unseen
categories included; more than TOLERANCE apart and the export is refused.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlops_ray.errors import ExportError
from mlops_ray.export import templates

FORMATS = ("onnx", "torchscript")
MODEL_FILE = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
TOLERANCE = 1e-5  # |probability(bundle) - probability(served)|, per row
UNSEEN = "<not a training category>"
MANIFEST = "MANIFEST.json"


@dataclass
class Bundle:
    fmt: str
    files: dict[str, bytes]  # every file but MANIFEST.json, which `manifest` describes
    manifest: dict[str, Any] = field(default_factory=dict)

    def all_files(self) -> dict[str, bytes]:
        return {**self.files, MANIFEST: _dumps(self.manifest)}


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r}: not an export format (allowed: {', '.join(FORMATS)})")
    return fmt


def default_name(model: str, version: int, fmt: str) -> str:
    return f"{model}-v{version}-{fmt}"


def lineage_of(version: Any) -> dict[str, Any]:
    """What MANIFEST.json records of a registry `Version`."""
    return {"model": version.model, "version": version.version, "ref": version.ref,
            "content_hash": version.content_hash, "artifact_uri": version.artifact_uri,
            "run": version.run_uri, "run_name": version.run_name,
            "data_version": version.data_version, "dataset_uri": version.dataset_uri,
            "config_hash": version.config_hash, "code_version": version.code_version,
            "aliases": list(version.aliases), "gate_passed": version.gate_passed}


def load_served(folder: Path, ref: str) -> Any:
    """The served model of a version folder: `Predictor.load`, as the Serve replicas do."""
    from mlops_ray.artifacts.predictor import Predictor
    if (folder / "reference.json").exists():
        return Predictor.load(folder, ref)
    # a version without a drift reference: the same objects, built the way Predictor.load does
    import torch

    from mlops_ray.data.preprocess import Preprocessor
    from mlops_ray.models import build_model
    meta = json.loads((folder / "meta.json").read_text())
    model = build_model(meta["model"], in_features=meta["in_features"])
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    from mlops_ray.artifacts.predictor import judged_rule
    sig = json.loads((folder / "signature.json").read_text())
    return Predictor(model.eval(), Preprocessor.from_dict(json.loads(
        (folder / "preprocessor.json").read_text())), sig, {}, ref, judged_rule(folder, sig))


# ------------------------------------------------------------------------------- example rows
def sample_rows(pre: Any, reference: dict[str, Any] | None, n: int, seed: int
                ) -> list[dict[str, Any]]:
    """Rows like the training data, drawn column by column (so not real rows): from the
    version's reference profile (numeric sample, missing share, category shares) when it has
    one, else from preprocessor.json (mean +- std, categories uniform)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    ref_num = (reference or {}).get("numeric", {})
    ref_cat = (reference or {}).get("categorical", {})
    for c in pre.numeric:
        prof = ref_num.get(c) or {}
        sample, missing = prof.get("sample"), float(prof.get("missing") or 0.0)
        for r in rows:
            if rng.random() < missing:
                r[c] = None
            elif sample:
                r[c] = float(rng.choice(sample))
            else:
                r[c] = round(float(pre.means[c] + pre.stds[c] * rng.standard_normal()), 3)
    for c in pre.categorical:
        shares = (ref_cat.get(c) or {}).get("shares") or {v: 1.0 for v in pre.categories[c]}
        keys = list(shares)
        if not keys:
            continue
        p = np.array([float(shares[k]) for k in keys])
        for r in rows:
            k = keys[int(rng.choice(len(keys), p=p / p.sum()))]
            r[c] = None if k == "<missing>" else k  # profile()'s name for missing
    return rows


def edge_rows(pre: Any, like: dict[str, Any]) -> list[dict[str, Any]]:
    """Every value missing; every category unseen in training."""
    missing = {c: None for c in [*pre.numeric, *pre.categorical]}
    unseen = {**like, **{c: UNSEEN for c in pre.categorical}}
    return [missing, unseen]


def records_of(rows: Any) -> list[dict[str, Any]]:
    """A DataFrame or a list of dicts -> JSON-ready records (NaN -> None, numpy -> Python)."""
    if hasattr(rows, "to_dict"):
        rows = rows.astype(object).where(rows.notna(), None).to_dict("records")
    out = []
    for r in rows:
        rec = {}
        for k, v in r.items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, float) and v != v:
                v = None
            rec[str(k)] = v
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------- build
def build_bundle(folder: str | Path, lineage: dict[str, Any], fmt: str, *,
                 check_rows: Any = None, n_example: int = 8, n_check: int = 256,
                 seed: int = 0) -> Bundle:
    """The bundle of the version in `folder` (a fetched, verified registry folder). `lineage`:
    `lineage_of(version)`. `check_rows` (DataFrame or records) are added to the parity check."""
    check_format(fmt)
    folder = Path(folder)
    ref = lineage.get("ref") or f"{lineage['model']}:{lineage['version']}"
    served = load_served(folder, ref)
    if served.attribute:
        from mlops_ray.errors import ExportError
        raise ExportError(
            f"{ref}: its judged decision rule includes a fairness post-processor (group "
            f"thresholds on {served.attribute!r}); ONNX and TorchScript bundles implement a "
            "plain threshold only, so the bundle would answer with another rule than the gates "
            "judged. Serve it (jobs.serve) or score with jobs.predict, which apply the rule")
    pre, sig = served.pre, served.signature
    reference = served.reference or None
    examples = sample_rows(pre, reference, n_example, seed)
    examples += edge_rows(pre, examples[0] if examples else {})
    checks = examples + sample_rows(pre, reference, n_check, seed + 1)
    if check_rows is not None:
        checks += records_of(check_rows)
    p_served, y_served = served.predict_records(checks)

    if fmt == "onnx":
        from mlops_ray.export import onnx_graph
        doc = (f"{ref} (content {lineage.get('content_hash', '')[:16]}): raw columns in, "
               f"probability and label (threshold {served.threshold}) out")
        proto = onnx_graph.build(served.model, pre, served.threshold, doc=doc, metadata={
            "mlops_ray.ref": ref, "mlops_ray.content_hash": str(lineage.get("content_hash")),
            "mlops_ray.threshold": repr(served.threshold)})
        model_bytes = proto.SerializeToString()
        p_bundle, y_bundle = _run_onnx(model_bytes, checks)
        example = templates.ONNX_EXAMPLE
    else:
        from mlops_ray.export import torchscript
        model_bytes = torchscript.build(served.model, pre, served.threshold)
        p_bundle, y_bundle = _run_torchscript(model_bytes, checks)
        example = templates.TORCHSCRIPT_EXAMPLE
    parity = _parity(p_bundle, y_bundle, p_served, y_served, served.threshold, fmt)

    n_ex = len(examples)
    origin = "reference.json" if reference else "preprocessor.json (it has no reference.json)"
    rows_doc: dict[str, Any] = {
        "source": (f"rows 0-{n_ex - 3}: drawn column by column from the version's {origin} "
                   f"(like the training data, not real records); row {n_ex - 2}: every value "
                   f"missing; row {n_ex - 1}: every category unseen in training"),
        "columns": {"numeric": list(pre.numeric), "categorical": list(pre.categorical)},
        "rows": examples,
        "expected": {"probability": [float(p) for p in p_served[:n_ex]],
                     "label": [int(y) for y in y_served[:n_ex]],
                     "by": f"the served model ({ref}, mlops_ray Predictor)"}}
    card = folder / "model_card.md"
    files = {
        MODEL_FILE[fmt]: model_bytes,
        "example.py": example.encode(),
        "example_rows.json": _dumps(rows_doc),
        "signature.json": (folder / "signature.json").read_bytes(),
        "preprocessor.json": (folder / "preprocessor.json").read_bytes(),
        "model_card.md": card.read_bytes() if card.exists() else (
            f"# {ref}\n\nNo model card was registered with this version (it was not registered "
            "by `jobs.promote`). See MANIFEST.json for its lineage.\n").encode(),
    }
    files["README.md"] = readme(fmt, lineage, sig, pre, parity, rows_doc["source"]).encode()
    return Bundle(fmt, files, manifest(fmt, files, lineage, served.threshold, parity))


def _run_onnx(model_bytes: bytes, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    from mlops_ray.export.onnx_graph import feeds
    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        p, y = session.run(["probability", "label"], feeds(session.get_inputs(), records))
    except Exception as e:  # onnxruntime's errors (Fail, InvalidGraph, ...) share no base
        raise ExportError(f"onnxruntime cannot run the exported graph: "
                          f"{str(e).splitlines()[0]}") from None
    return np.asarray(p, dtype=np.float64).reshape(-1), np.asarray(y).reshape(-1)


def _run_torchscript(model_bytes: bytes, records: list[dict[str, Any]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    import io

    import torch

    from mlops_ray.export.torchscript import inputs
    module = torch.jit.load(io.BytesIO(model_bytes))
    with torch.inference_mode():
        p, y = module(*inputs(module, records))
    return p.numpy().astype(np.float64).reshape(-1), y.numpy().reshape(-1)


def _parity(p: np.ndarray, y: np.ndarray, p_ref: np.ndarray, y_ref: np.ndarray,
            threshold: float, fmt: str) -> dict[str, Any]:
    p_ref, y_ref = np.asarray(p_ref, dtype=np.float64).reshape(-1), np.asarray(y_ref).reshape(-1)
    if p.shape != p_ref.shape:
        raise ExportError(f"{fmt} bundle returned {p.shape[0]} probabilities for "
                          f"{p_ref.shape[0]} rows")
    diff = np.abs(p - p_ref)
    worst = float(diff.max()) if diff.size else 0.0
    # a label may flip only where the probability sits within the tolerance of the threshold
    flipped = np.nonzero((y != y_ref) & (np.abs(p_ref - threshold) > TOLERANCE))[0]
    if not worst <= TOLERANCE or flipped.size:
        i = int(np.nanargmax(diff)) if diff.size else 0
        raise ExportError(f"{fmt} bundle does not match the served model: max |probability "
                          f"difference| {worst:.3g} (row {i}; allowed {TOLERANCE:g}), "
                          f"{flipped.size} label(s) differ; nothing written")
    return {"rows": int(p.size), "max_abs_diff": worst, "tolerance": TOLERANCE,
            "against": "mlops_ray.artifacts.predictor.Predictor.predict_records"}


def manifest(fmt: str, files: dict[str, bytes], lineage: dict[str, Any], threshold: float,
             parity: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import mlops_ray
    from mlops_ray.export.onnx_graph import OPSET
    return {
        "format": fmt, "model_file": MODEL_FILE[fmt], "threshold": threshold,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "lineage": lineage, "parity": parity,
        "exporter": {"mlops_ray": mlops_ray.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     **({"opset": OPSET} if fmt == "onnx" else {})},
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                  for n, b in sorted(files.items())}}


def readme(fmt: str, lineage: dict[str, Any], sig: dict[str, Any], pre: Any,
           parity: dict[str, Any], rows_source: str) -> str:
    ref = lineage.get("ref")
    runtime = ("onnxruntime and numpy" if fmt == "onnx" else "torch")
    install = ("pip install onnxruntime numpy" if fmt == "onnx" else "pip install torch")
    cols = [f"| `{c}` | numeric | float64; null/NaN/not a number -> training median "
            f"{pre.medians[c]:g} |" for c in pre.numeric]
    cols += [f"| `{c}` | categorical | string, one of {len(pre.categories[c])} training "
             f"categories (signature.json); null, \"\" or another value -> all-zero one-hot |"
             for c in pre.categorical]
    if fmt == "onnx":
        call = ("One graph input per column below, shape [N, 1] (numeric: tensor(double), "
                "categorical: tensor(string)); outputs `probability` float32 [N] and `label` "
                f"int64 [N] (probability >= {sig['threshold']}). The preprocessing "
                "(median impute, standardise, one-hot) is inside the graph (opset "
                "20, onnxruntime >= 1.17).")
    else:
        call = ("`model(numeric, categorical)`: numeric float64 [N, len(model.numeric_columns)] "
                "(NaN = missing), categorical a list of N lists of str or None in "
                "`model.categorical_columns` order; returns (probability float32 [N], label "
                f"int64 [N]) (probability >= {sig['threshold']}). The preprocessing is inside "
                "the module. Loads in Python (`torch.jit.load`) or C++ (libtorch).")
    lines = [
        f"# {ref} ({fmt} bundle)", "",
        f"Self-contained export of registry version `{ref}` (content hash "
        f"`{lineage.get('content_hash')}`). Needs only {runtime}: no Ray, no mlops_ray, no "
        "network.", "",
        "```bash", install, "python example.py                 # scores example_rows.json",
        "python example.py my_rows.json    # your rows: {\"rows\": [{column: value, ...}, ...]}",
        "```", "",
        "## Inputs and outputs", "", call, "",
        "| column | kind | encoding |", "|---|---|---|", *cols, "",
        f"Label: `{sig.get('label')}` (positive class {sig.get('positive')}). Columns listed in "
        "signature.json as optional (sensitive attributes) are not model inputs.", "",
        "## Parity with the served model", "",
        f"Checked at export on {parity['rows']} rows (with missing values and unseen "
        f"categories) against `{parity['against']}`: max |probability difference| "
        f"{parity['max_abs_diff']:.2e} (allowed {parity['tolerance']:g}). The example prints "
        "its own difference to the served model's answers stored in example_rows.json.", "",
        f"Example rows: {rows_source}.", "",
        "## Files", "",
        f"- `{MODEL_FILE[fmt]}`: the model; `example.py`, `example_rows.json`: the example",
        "- `signature.json`: input/output contract, threshold; `preprocessor.json`: the fitted "
        "preprocessing (for reference: it is already inside the model)",
        "- `model_card.md`: the version's model card; `MANIFEST.json`: SHA-256 of every file, "
        "lineage (run, data version, content hash), export checks", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- write
def write_bundle(bundle: Bundle, dest: Any) -> str:
    """Write to `dest` (a Storage naming the bundle folder); returns its URI. Local: built in a
    temporary sibling folder and renamed into place (a previous export of the same name is
    replaced whole). Object stores: files first, MANIFEST.json last (its presence marks a
    complete bundle)."""
    files = bundle.all_files()
    if not dest.is_local:
        for name, data in bundle.files.items():
            dest.write_bytes(data, name)
        dest.write_bytes(files[MANIFEST], MANIFEST)
        return str(dest.uri)
    final = Path(dest.path())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the previous bundle back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(dest.uri)


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """Re-hash a written bundle against its MANIFEST.json; returns the manifest."""
    folder = Path(folder)
    man = json.loads((folder / MANIFEST).read_text())
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(man["files"]):
        raise ExportError(f"bundle {folder}: files differ from {MANIFEST} (missing: "
                          f"{sorted(set(man['files']) - present)}, unexpected: "
                          f"{sorted(present - set(man['files']))})")
    for name, entry in man["files"].items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != entry["sha256"]:
            raise ExportError(f"bundle {folder}: {name} does not match its SHA-256 in {MANIFEST}")
    return dict(man)
