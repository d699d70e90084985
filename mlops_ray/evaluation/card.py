"""Model card from a gate report: Markdown, PNG plots, and a self-contained HTML copy (no Ray).

The report (JSON-able dict, written by jobs.evaluate) that `write_model_card` reads:

    model:      {name, version?, description?, intended_use, out_of_scope?}
    lineage:    {run, data_version, config_hash, code_version}
    data:       {dataset?, rows: {split: int}, positive_rate: {split: float},
                 groups: {attr: {group: count}}}               # sensitive-group sizes
    config:     {key: value, ...}       # training config summary; nested dicts shown dotted
    cv:         {k, folds: [{fold, rows, auc, pr_auc, ...}],   # one dict per fold (cv.run_fold)
                 summary: {"cv/<m>_mean"|"_std"|"_ci_low"|"_ci_high": float}}  # cv.summarise
    test:       {metrics: {"test/<m>": float}, ci: {"test/<m>": [low, high]}}
    threshold:  {objective: "f1"|"youden"|"accuracy", value: float}   # chosen on validation
    fairness:   fairness.fairness_report(...) on the test rows
    mitigation: fairness.mitigation_summary(...) or None
    champion:   gates.compare_to_champion(...) or None
    gates:      [GateResult.to_dict(), ...]
    passed:     bool, equal to gates.passed(report)
    curves:     {y_test: [0|1], p_test: [float], p_champion?: [float]}  # <= 5000 rows each,
                                                                        # see downsample_curves
    limitations?: [str]                 # extra, model-specific limitations

Missing optional sections are skipped (with their plots), never invented.
"""
from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state in library code
from sklearn.metrics import roc_auc_score, roc_curve

from mlops_ray.evaluation.gates import passed as gates_passed

MAX_CURVE_POINTS = 5000


def downsample_curves(y: np.ndarray, p: np.ndarray, max_points: int = MAX_CURVE_POINTS,
                      seed: int = 0, **others: np.ndarray) -> dict[str, list]:
    """The report's `curves`: at most `max_points` rows, sampled per label so the label balance
    (hence the ROC and calibration shapes) is kept; `others` (e.g. p_champion) share the rows."""
    y = np.asarray(y).astype(int)
    keep = np.arange(len(y))
    if len(y) > max_points:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([
            rng.choice(idx, size=max(1, round(max_points * len(idx) / len(y))), replace=False)
            for idx in (np.flatnonzero(y == c) for c in np.unique(y))]))[:max_points]
    out = {"y_test": y[keep].tolist(), "p_test": np.asarray(p, dtype=float)[keep].tolist()}
    out.update({k: np.asarray(v, dtype=float)[keep].tolist() for k, v in others.items()})
    return out


def _f(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(lo: Any, hi: Any, *, digits: int = 4) -> str:
    return f"[{_f(lo, digits)}, {_f(hi, digits)}]"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in cells), ""]


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---- plots ---------------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_roc(curves: Mapping[str, Any], path: Path) -> Path:
    y = np.asarray(curves["y_test"])
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    for key, label in (("p_test", "candidate"), ("p_champion", "champion")):
        if key in curves:
            fpr, tpr, _ = roc_curve(y, curves[key])
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, curves[key]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_calibration(curves: Mapping[str, Any], path: Path, bins: int = 10) -> Path:
    y, p = np.asarray(curves["y_test"], dtype=float), np.asarray(curves["p_test"], dtype=float)
    idx = np.clip(np.digitize(p, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    used = n > 0
    conf = np.bincount(idx, weights=p, minlength=bins)[used] / n[used]
    acc = np.bincount(idx, weights=y, minlength=bins)[used] / n[used]
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.plot(conf, acc, marker="o")
    ax.scatter(conf, acc, s=20 + 200 * n[used] / n.max(), alpha=0.3)  # marker area ~ bin size
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate",
           title="calibration (test)", xlim=(0, 1), ylim=(0, 1))
    return _save(fig, path)


def _plot_group_rates(attr: str, rep: Mapping[str, Any], path: Path) -> Path:
    groups = rep["groups"]
    x = np.arange(len(groups))
    fig = Figure(figsize=(max(4.5, 1.2 * len(groups) + 2), 3.8))
    ax = fig.add_subplot()
    for j, (key, label) in enumerate((("rate", "selection rate"), ("tpr", "TPR"), ("fpr", "FPR"))):
        v = np.array([g[key] for g in groups], dtype=float)
        lo = np.array([g[f"{key}_ci"][0] for g in groups], dtype=float)
        hi = np.array([g[f"{key}_ci"][1] for g in groups], dtype=float)
        err = np.nan_to_num(np.vstack([v - lo, hi - v]).clip(min=0))
        ax.bar(x + (j - 1) * 0.27, np.nan_to_num(v), 0.27, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, [g["group"] + (" *" if g["small"] else "") for g in groups],
                  rotation=20, ha="right")
    ax.set(ylim=(0, 1.2), title=f"rates by {attr} (test, 95% CI; * small group)")
    ax.legend(fontsize="small", loc="upper center", ncol=3)
    return _save(fig, path)


def _plot_cv(folds: list[Mapping[str, Any]], summary: Mapping[str, float], path: Path) -> Path:
    auc = np.array([f["auc"] for f in folds], dtype=float)
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot()
    ax.boxplot(auc, orientation="horizontal", widths=0.5)
    ax.scatter(auc, np.ones_like(auc), zorder=3, c="C1", label="folds")
    lo, hi = summary.get("cv/auc_ci_low"), summary.get("cv/auc_ci_high")
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        ax.axvspan(lo, hi, alpha=0.15, label="95% CI of mean")
    ax.axvline(float(np.mean(auc)), c="C2", label=f"mean {np.mean(auc):.4f}")
    ax.set(xlabel="ROC AUC", yticks=[], title=f"cross-validation AUC ({len(auc)} folds)")
    ax.legend(fontsize="small")
    return _save(fig, path)


# ---- markdown ------------------------------------------------------------------------------

def _gate_rows(gates: list[Mapping[str, Any]]) -> list[list[Any]]:
    from mlops_ray.evaluation.gates import compared
    return [[g["name"], f"`{g['metric']}`", f"{g['on']} {_f(compared(g))}", g["op"],
             f"{g['threshold']:g}", _f(g["value"]), _ci(*g["ci"]) if g.get("ci") else "-",
             "**PASS**" if g["passed"] else "**FAIL**", g.get("detail", "")] for g in gates]


def _limitations(report: Mapping[str, Any]) -> list[str]:
    out = ["Metrics describe the test rows of this dataset version; other populations, time "
           "periods or feature pipelines may behave differently.",
           f"The decision threshold was chosen on validation rows "
           f"({report.get('threshold', {}).get('objective', 'n/a')}); re-check it when base "
           f"rates change."]
    fair = report.get("fairness") or {}
    for attr, rep in (fair.get("attributes") or {}).items():
        if rep["small_groups"]:
            out.append(f"`{attr}`: groups below {fair.get('min_group_size')} rows "
                       f"({', '.join(rep['small_groups'])}) are reported but not gated: the "
                       "gaps are computed over the other groups (their estimates are "
                       "unreliable, see the CIs).")
        undefined = sorted(set(rep["tpr_undefined"]) | set(rep["fpr_undefined"]))
        if undefined:
            out.append(f"`{attr}`: {', '.join(undefined)} lack positives or negatives; their "
                       f"undefined TPR/FPR is left out of eo_diff.")
    mit = report.get("mitigation")
    if mit and mit.get("requires_sensitive_at_prediction"):
        out.append(f"Mitigation needs `{mit.get('attribute')}` at prediction time: "
                   f"{mit.get('note', '')}")
    out.append("Group fairness metrics cover one attribute at a time, not intersections.")
    library = ((report.get("config") or {}).get("model") or {}).get("library")
    if library:
        out.append(f"The model is gradient-boosted trees ({library}), trained without an "
                   "in-training fairness penalty (the mitigation above is post-processing); "
                   "feature importances are shares of total gain, not causal effects.")
    return out + list(report.get("limitations") or [])


def _markdown(report: Mapping[str, Any], plots: Mapping[str, Path]) -> str:
    model, lineage = report.get("model") or {}, report.get("lineage") or {}
    ok = gates_passed(report)
    md = [f"# Model card: {model.get('name', 'model')}"
          + (f" (version {model['version']})" if model.get("version") else ""), "",
          f"**Gate verdict: {'PASS' if ok else 'FAIL'}**"
          + ("" if report.get("passed", ok) == ok else " (stored `passed` disagrees!)"), ""]
    if model.get("description"):
        md += [model["description"], ""]
    md += ["## Intended use", "", model.get("intended_use", "Not stated."), ""]
    if model.get("out_of_scope"):
        md += [f"Out of scope: {model['out_of_scope']}", ""]
    md += ["## Lineage", "", *_table(["field", "value"],
                                     [[k, f"`{v}`"] for k, v in _flat(lineage) if v is not None])]

    data = report.get("data") or {}
    md += ["## Data", ""]
    if data.get("dataset"):
        md += [f"Dataset: `{data['dataset']}`", ""]
    rows, pos = data.get("rows") or {}, data.get("positive_rate") or {}
    if rows:
        md += _table(["split", "rows", "positive rate"],
                     [[s, n, _f(pos.get(s), 3)] for s, n in rows.items()])
    for attr, sizes in (data.get("groups") or {}).items():
        md += [f"Sensitive attribute `{attr}`:", "", *_table(["group", "rows"],
                                                             [[g, n] for g, n in sizes.items()])]

    if report.get("config"):
        md += ["## Training configuration", "",
               *_table(["key", "value"], [[f"`{k}`", v] for k, v in _flat(report["config"])])]

    if report.get("feature_importance"):
        md += ["## Feature importance (share of the booster's total gain, top features)", "",
               *_table(["feature", "share"], [[f"`{k}`", _f(v, 3)] for k, v in
                                              report["feature_importance"].items()])]

    test = report.get("test") or {}
    md += ["## Test metrics", ""]
    if report.get("threshold"):
        t = report["threshold"]
        pp = (report.get("rule") or {}).get("postprocessor")
        if pp:  # the labels the gates judged (and Serve gives) are the post-processed ones
            md += [f"Decision rule (`rule.json`, what Serve and `jobs.predict` apply): "
                   f"**mitigated**, group thresholds on `{pp['attribute']}` "
                   f"({pp['constraint']}, Fairlearn ThresholdOptimizer fitted on validation "
                   f"rows). The unmitigated threshold would be {_f(t.get('value'))} (chosen "
                   f"on validation rows by {t.get('objective')}). Accuracy, F1 and the "
                   "fairness tables are of the **mitigated** labels; AUC and the CV figures "
                   "are threshold-free.", ""]
        else:
            md += [f"Decision rule: threshold {_f(t.get('value'))}, chosen on validation "
                   f"rows by {t.get('objective')} (**unmitigated**).", ""]
        if r := t.get("max_rate_ratio"):
            md += [f"Why this threshold: among thresholds whose predicted-positive rate on "
                   f"validation rows stays within 1/{r:g}x-{r:g}x the base rate, the best by "
                   f"{t.get('objective')}; unconstrained, F1 can put most rows positive on "
                   "balanced data (`threshold.max_rate_ratio`, null for plain F1).", ""]
    cis = test.get("ci") or {}
    md += _table(["metric", "value", "95% CI"],
                 [[f"`{k}`", _f(v), _ci(*cis[k]) if k in cis else "-"]
                  for k, v in (test.get("metrics") or {}).items()])
    md += [f"![{k}]({plots[k].name})" for k in ("roc", "calibration") if k in plots] + [""]

    cv = report.get("cv") or {}
    if cv.get("folds"):
        summ = cv.get("summary") or {}
        names = sorted({k[3:-5] for k in summ if k.startswith("cv/") and k.endswith("_mean")})
        md += [f"## Cross-validation ({cv.get('k', len(cv['folds']))} folds)", "",
               *_table(["metric", "mean", "std", "95% CI (t)"],
                       [[m, _f(summ.get(f"cv/{m}_mean")), _f(summ.get(f"cv/{m}_std")),
                         _ci(summ.get(f"cv/{m}_ci_low"), summ.get(f"cv/{m}_ci_high"))]
                        for m in names])]
        cols = [c for c in cv["folds"][0] if c != "threshold"]
        md += _table(cols, [[_f(f.get(c)) for c in cols] for f in cv["folds"]])
        if "cv_auc" in plots:
            md += [f"![cv_auc]({plots['cv_auc'].name})", ""]

    fair = report.get("fairness") or {}
    if fair.get("attributes"):
        md += ["## Fairness (test rows, thresholded predictions)", "",
               f"Bootstrap CIs ({fair.get('n_boot')} resamples, stratified by group). Groups "
               f"under {fair.get('min_group_size')} rows are flagged *small*: reported, never "
               "merged, and left out of the gaps the gates compare.", ""]
        for attr, rep in fair["attributes"].items():
            md += [f"### `{attr}`", "",
                   *_table(["metric", "value", "95% CI"],
                           [[f"`fair/{m}_{attr}`", _f(rep[m]["value"]),
                             _ci(rep[m]["ci_low"], rep[m]["ci_high"])]
                            for m in ("dp_diff", "dp_ratio", "eo_diff")]),
                   *_table(["group", "rows", "positives", "selection rate", "TPR", "FPR",
                            "precision", "small"],
                           [[g["group"], g["count"], g["positives"],
                             f"{_f(g['rate'], 3)} {_ci(*g['rate_ci'], digits=3)}",
                             f"{_f(g['tpr'], 3)} {_ci(*g['tpr_ci'], digits=3)}",
                             f"{_f(g['fpr'], 3)} {_ci(*g['fpr_ci'], digits=3)}",
                             _f(g["precision"], 3), "yes" if g["small"] else ""]
                            for g in rep["groups"]])]
            for rate, label in (("tpr", "positives"), ("fpr", "negatives")):
                if rep[f"{rate}_undefined"]:
                    md += [f"No {label}, so {rate.upper()} undefined and left out of eo_diff: "
                           f"{', '.join(rep[f'{rate}_undefined'])}.", ""]
            key = f"group_rates_{_safe(attr)}"
            if key in plots:
                md += [f"![{key}]({plots[key].name})", ""]

    mit = report.get("mitigation")
    if mit:
        md += ["## Mitigation", ""]
        if mit.get("requires_sensitive_at_prediction"):
            md += [f"{mit['name']} ({mit.get('constraint')}) on `{mit.get('attribute')}`, fitted "
                   f"on {mit.get('fitted_on', 'validation rows')}.", "",
                   f"**Sensitive attribute needed at prediction time.** {mit.get('note', '')}", ""]
        else:  # e.g. an in-training penalty: describe it by its settings
            md += [f"{mit['name']}; the sensitive attribute is not needed at prediction time.", "",
                   *_table(["setting", "value"], [[f"`{k}`", v] for k, v in _flat(mit)
                                                  if k not in ("name",
                                                               "requires_sensitive_at_prediction")])]
        if mit.get("before") and mit.get("after"):
            keys = sorted(set(mit["before"]) | set(mit["after"]))
            md += _table(["", *keys], [[row, *(_f(mit[row].get(k)) for k in keys)]
                                       for row in ("before", "after")])

    champ = report.get("champion")
    if champ:
        md += ["## Champion comparison", "",
               f"{champ['test']} on `{champ['metric']}`: candidate {_f(champ['candidate'])}, "
               f"champion {_f(champ['champion'])}, delta {_f(champ['delta'])} "
               f"{_ci(champ['ci_low'], champ['ci_high'])}, one-sided p {champ['p_value']:.3g}.",
               ""]

    gates = report.get("gates") or []
    md += ["## Gates", "",
           *_table(["gate", "metric", "compared", "op", "threshold", "point", "95% CI",
                    "result", "detail"], _gate_rows(gates)),
           f"**Verdict: {'PASS' if ok else 'FAIL'}** "
           f"({sum(bool(g['passed']) for g in gates)}/{len(gates)} gates passed)", ""]
    md += ["## Limitations", "", *(f"- {x}" for x in _limitations(report)), ""]
    return "\n".join(md)


# ---- html ----------------------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .5em;text-align:left}img{max-width:100%}code{background:#f4f4f4}")


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", s)


def markdown_to_html(md: str, images: Mapping[str, Path], title: str) -> str:
    """A converter for exactly the Markdown `_markdown` writes (headings, paragraphs, lists,
    pipe tables, image lines), with images embedded as base64 so the file stands alone."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.fullmatch(r"(#{1,6}) (.*)", line):
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
        elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line):
            data = base64.b64encode(images[m[2]].read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(m[1])}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(re.split(r"(?<!\\)\|", lines[i].strip())[1:-1])
                i += 1
            head, body = block[0], block[2:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c.strip())}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(
                           f"<td>{_inline(c.strip().replace(chr(92) + '|', '|'))}</td>"
                           for c in r) + "</tr>" for r in body) + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_model_card(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write model_card.md, model_card.html and the PNG plots into `out_dir`; return
    {"markdown", "html", "roc", "calibration", "cv_auc", "group_rates_<attr>": path}, listing
    only the plots whose data the report has."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    curves = report.get("curves") or {}
    if curves.get("y_test") and len(set(curves["y_test"])) == 2:
        plots["roc"] = _plot_roc(curves, out_dir / "roc.png")
        plots["calibration"] = _plot_calibration(curves, out_dir / "calibration.png")
    cv = report.get("cv") or {}
    if cv.get("folds"):
        plots["cv_auc"] = _plot_cv(cv["folds"], cv.get("summary") or {}, out_dir / "cv_auc.png")
    for attr, rep in ((report.get("fairness") or {}).get("attributes") or {}).items():
        key = f"group_rates_{_safe(attr)}"
        plots[key] = _plot_group_rates(attr, rep, out_dir / f"{key}.png")
    md = _markdown(report, plots)
    md_path = out_dir / "model_card.md"
    md_path.write_text(md)
    html_path = out_dir / "model_card.html"
    html_path.write_text(markdown_to_html(md, {p.name: p for p in plots.values()},
                                          f"Model card: {(report.get('model') or {}).get('name')}"))
    return {"markdown": md_path, "html": html_path, **plots}
