"""Dashboards and alerts as code for the project's own metrics (mlops_ray/metrics.py).

Shipped with the package:
  * `DASHBOARD` (grafana_dashboard.json): a Grafana dashboard of every catalog metric;
  * `ALERTS` (alerts.yml): Prometheus alert rules, unit-tested by `ALERTS_TEST`
    (`promtool test rules mlops_ray/observability/alerts_test.yml`).
Both use only the series names of `mlops_ray.metrics.exported_names` (tests/unit checks it,
tests/integration checks that a Prometheus scraping a local Ray finds them all). The KubeRay
manifests in cluster/kuberay/ embed these files (tools/gen_observability.py). Guide:
docs/monitoring.md.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana_dashboard.json"
ALERTS = HERE / "alerts.yml"
ALERTS_TEST = HERE / "alerts_test.yml"
DASHBOARD_FILE = "mlops_ray_grafana_dashboard.json"  # its name in Grafana's dashboards folder
# Ray's own default session folder (a fixed path is Ray's choice, not a temp file of ours)
SESSION_LATEST = "/tmp/ray/session_latest"  # nosec B108

_SERIES = re.compile(r"\bray_mlops_[A-Za-z0-9_]+")


def series_in(text: str) -> set[str]:
    """The `ray_mlops_*` series names a PromQL expression uses."""
    return set(_SERIES.findall(text))


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of `ALERTS`, over all groups."""
    import yaml
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def rule_metric_names() -> set[str]:
    """The series names the alert rules use."""
    return set().union(*(series_in(str(r["expr"])) for r in alert_rules()))


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs(dash: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL query of the dashboard: panel targets (rows' nested panels included) and
    template variables."""
    dash = dash if dash is not None else dashboard()
    out: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.extend(str(t["expr"]) for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        out.append(str(q.get("query", "")) if isinstance(q, dict) else str(q or ""))
    return [e for e in out if e]


def dashboard_metric_names() -> set[str]:
    """The series names the dashboard uses."""
    return set().union(*(series_in(e) for e in dashboard_exprs()))


def _dashboards_folder(session_dir: Path) -> Path:
    """Where Ray's Grafana provisioning of this session reads dashboards from: the `path:` of
    metrics/grafana/provisioning/dashboards/default.yml (Ray writes it when its dashboard
    starts; RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR moves it), else metrics/grafana/dashboards."""
    grafana = session_dir / "metrics" / "grafana"
    provisioning = grafana / "provisioning" / "dashboards" / "default.yml"
    if provisioning.is_file():
        m = re.search(r"^\s*path:\s*(\S+)\s*$", provisioning.read_text(), re.MULTILINE)
        if m:
            return Path(m.group(1))
    return grafana / "dashboards"


def install_dashboard(session_dir: str | None = None) -> Path | None:
    """Copy the dashboard into the Grafana dashboards folder of a local Ray session, next to
    Ray's own dashboards; a Grafana started with Ray's grafana.ini (`--config
    <session>/metrics/grafana/grafana.ini`) loads it into its "Ray" folder. `session_dir`:
    default /tmp/ray/session_latest; pass the session's own folder where Ray's temp dir is
    elsewhere (`ray.init(...).address_info["session_dir"]`). Ray's dashboard (re)creates that
    folder when it starts, so call this after (a head started with its dashboard). Returns the
    copy's path, or None where the folder does not exist (no dashboard, no local session)."""
    base = Path(session_dir if session_dir is not None else SESSION_LATEST)
    folder = _dashboards_folder(base)
    if not folder.is_dir():
        return None
    dst = folder / DASHBOARD_FILE
    shutil.copyfile(DASHBOARD, dst)
    return dst
