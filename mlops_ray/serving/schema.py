"""Request validation from a version's input signature (no Ray): every offending field of every
record is named in one 422 answer; nothing malformed reaches a model replica. Also the Open
Inference Protocol v2 tensor <-> records conversion."""
from __future__ import annotations

import math
from typing import Any

from mlops_ray.errors import RequestInvalid

# what a field may hold (the OpenAPI document, openapi.py, states the same limits)
NUMBER_LIMIT = 1e12  # |numeric value|, |integer category|
MAX_STRING = 256  # characters of a categorical value


def _number(v: Any) -> float | None:
    """A JSON number within +-NUMBER_LIMIT as float; None for anything else (strings too)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        return None
    return f if math.isfinite(f) and abs(f) <= NUMBER_LIMIT else None


def _short(v: Any, n: int = 40) -> str:
    """A client's value as echoed in an error: repr, cut to `n` characters."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _name(k: Any) -> str:
    return _short(k, 60).strip("'\"")


def validate_records(records: Any, signature: dict[str, Any], max_rows: int,
                     unknown_categories: str = "allow") -> list[dict[str, Any]]:
    """Clean records (numbers as float, categories as str) or RequestInvalid naming every field."""
    if not isinstance(records, list) or not records:
        raise RequestInvalid(["records: must be a non-empty list of objects"])
    if len(records) > max_rows:
        raise RequestInvalid([f"records: {len(records)} rows, at most {max_rows} per request"], 413)
    fields = {f["name"]: f for f in signature["inputs"]}
    problems: list[str] = []
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"records[{i}]: must be an object, got {type(rec).__name__}")
            continue
        clean: dict[str, Any] = {}
        unknown = sorted(map(_name, rec.keys() - fields.keys()))
        if unknown:  # named once per record, the allowed fields once per answer (below)
            problems.append(f"records[{i}]: unknown field(s) {unknown[:5]}"
                            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        for name, f in fields.items():
            if name not in rec:
                if f.get("required", True):
                    problems.append(f"records[{i}].{name}: required field is missing (send null "
                                    "for an unknown value)")
                continue
            v = rec[name]
            if v is None and f.get("closed") and "missing" not in f.get("categories", []):
                problems.append(f"records[{i}].{name}: must be one of {f['categories']} (the "
                                "decision rule needs it)")
                continue
            if v is None:  # the saved preprocessing imputes missing values as in training
                clean[name] = None
                continue
            if f["kind"] == "numeric":
                num = _number(v)
                if num is None:
                    problems.append(f"records[{i}].{name}={_short(v)}: must be a number "
                                    f"(|x| <= {NUMBER_LIMIT:g}) or null")
                clean[name] = num
            else:
                cats = f.get("categories")
                closed = bool(cats and (f.get("closed") or unknown_categories == "reject"))
                if closed and not isinstance(v, str):
                    problems.append(f"records[{i}].{name}={_short(v)}: must be one of the "
                                    f"strings {cats[:12]}")
                    continue
                if isinstance(v, float) and v.is_integer() and abs(v) <= NUMBER_LIMIT:
                    v = int(v)  # JSON Schema's integer: 5054.0 is one
                if isinstance(v, bool) or not isinstance(v, str | int) or (
                        isinstance(v, str) and len(v) > MAX_STRING) or (
                        isinstance(v, int) and abs(v) > NUMBER_LIMIT):
                    problems.append(f"records[{i}].{name}={_short(v)}: must be a string (at most "
                                    f"{MAX_STRING} characters), an integer or null")
                    continue
                v = str(v)
                if closed and v not in cats:
                    shown = cats if len(cats) <= 12 else cats[:12] + ["..."]
                    problems.append(f"records[{i}].{name}={_short(v)}: unknown category (allowed: "
                                    f"{shown})")
                clean[name] = v
        out.append(clean)
    if problems:
        if any("unknown field" in p for p in problems):
            problems.append(f"allowed fields: {sorted(fields)}")
        raise RequestInvalid(problems)
    return out


OIP_TYPES = {"FP64", "FP32", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL", "BYTES"}


def oip_to_records(body: Any, signature: dict[str, Any], max_rows: int) -> list[dict[str, Any]]:
    """OIP v2 infer request (one 1-D tensor per input column, or one 2-D BYTES/FP64 tensor
    named `records` is not supported: columns only) -> records."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestInvalid(["inputs: must be a non-empty list of tensors"])
    problems: list[str] = []
    cols: dict[str, list] = {}
    n = None
    for j, t in enumerate(body["inputs"]):
        where = f"inputs[{j}]" + (f" ({t.get('name')})" if isinstance(t, dict) else "")
        if not isinstance(t, dict):
            problems.append(f"{where}: must be an object")
            continue
        missing = [k for k in ("name", "shape", "datatype", "data") if k not in t]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if t["datatype"] not in OIP_TYPES:
            problems.append(f"{where}.datatype={t['datatype']!r}: allowed {sorted(OIP_TYPES)}")
        shape, data = t["shape"], t["data"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                and len(shape) in (1, 2) and (len(shape) == 1 or shape[1] == 1)):
            problems.append(f"{where}.shape={shape!r}: must be [n] or [n, 1]")
            continue
        if not isinstance(data, list):
            problems.append(f"{where}.data: must be a list")
            continue
        flat = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data]
        if len(flat) != shape[0]:
            problems.append(f"{where}: shape says {shape[0]} values, data has {len(flat)}")
            continue
        if n is not None and shape[0] != n:
            problems.append(f"{where}: {shape[0]} rows, other inputs have {n}")
            continue
        n = shape[0]
        cols[t["name"]] = flat
    if problems:
        raise RequestInvalid(problems)
    if n is not None and n > max_rows:
        raise RequestInvalid([f"inputs: {n} rows, at most {max_rows} per request"], 413)
    return [{c: v[i] for c, v in cols.items()} for i in range(n or 0)]


def oip_metadata(name: str, version: str, signature: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "versions": [version], "platform": "pytorch_mlops_ray",
            "inputs": [{"name": f["name"], "datatype": f["datatype"], "shape": [-1]}
                       for f in signature["inputs"]],
            "outputs": signature["outputs"]}
