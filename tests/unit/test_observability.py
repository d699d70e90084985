"""The shipped Grafana dashboard and Prometheus alert rules (mlops_ray/observability): they use
only series of the metric catalog, the rules pass promtool's checks and unit tests, and the
KubeRay manifests embed exactly the shipped files. No Ray here; the scrape of a real local Ray
is tests/integration/test_observability.py."""
from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlops_ray import metrics, observability
from mlops_ray.observability import ALERTS, ALERTS_TEST, DASHBOARD

REPO = Path(__file__).resolve().parents[2]
EXPORTED = {n for name in metrics.CATALOG for n in metrics.exported_names(name)}
ALERTS_REQUIRED = {"MlopsFeatureDrift", "MlopsLiveGateFailing", "MlopsCanaryRolledBack",
                   "MlopsServeErrorRate", "MlopsPreemption", "MlopsPredictionLogLag",
                   "MlopsPredictionLogDropping", "MlopsFeatureFreshnessLag"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not found (Debian: apt-get install prometheus; .ci/run installs "
                    "it): the alert rules were not checked")
    return found


def test_exported_names_follow_rays_naming():
    """As a scrape of Ray 2.60 shows (tests/integration/test_observability.py): counters get
    `_total`, histograms `_bucket`/`_count`/`_sum`, gauges stay as they are."""
    assert metrics.exported_names("mlops_serve_requests") == ["ray_mlops_serve_requests_total"]
    assert metrics.exported_names("mlops_serve_latency_ms") == [
        "ray_mlops_serve_latency_ms_bucket", "ray_mlops_serve_latency_ms_count",
        "ray_mlops_serve_latency_ms_sum"]
    assert metrics.exported_names("mlops_predlog_lag_seconds") == ["ray_mlops_predlog_lag_seconds"]


def test_rules_use_only_catalog_series():
    used = observability.rule_metric_names()
    assert used and used <= EXPORTED, sorted(used - EXPORTED)


def test_dashboard_uses_only_catalog_series_and_shows_every_metric():
    used = observability.dashboard_metric_names()
    assert used <= EXPORTED, sorted(used - EXPORTED)
    unseen = [n for n in metrics.CATALOG if not set(metrics.exported_names(n)) & used]
    assert not unseen, f"catalog metrics with no dashboard panel: {unseen}"


def test_series_parser_sees_every_name():
    expr = ('sum by (m) (rate(ray_mlops_serve_errors_total{kind="model"}[5m])) / '
            'histogram_quantile(0.5, ray_mlops_serve_latency_ms_bucket) + ray_node_cpu')
    assert observability.series_in(expr) == {"ray_mlops_serve_errors_total",
                                             "ray_mlops_serve_latency_ms_bucket"}


def test_alert_rules_shape():
    rules = {r["alert"]: r for r in observability.alert_rules()}
    assert ALERTS_REQUIRED <= set(rules)
    for name, r in rules.items():
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = r["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(ann), name
        anchor = name.lower()
        assert ann["runbook_url"] == f"docs/monitoring.md#{anchor}", name
        assert f"docs/monitoring.md#{anchor}" in ann["description"], name
        # names what it is about: the model (and version where the rule keeps it), the run, or
        # the feature store (project)
        about = ("run" if "train_" in r["expr"] else
                 "project" if "features_" in r["expr"] else "model")
        assert f"$labels.{about}" in ann["summary"] + ann["description"], name
        if re.search(r"by \([^)]*version", r["expr"]):
            assert "$labels.version" in ann["summary"] + ann["description"], name


def test_every_alert_has_a_runbook_section():
    doc = (REPO / "docs" / "monitoring.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^#+ (.+)$", doc, re.MULTILINE)}
    missing = [a["alert"] for a in observability.alert_rules()
               if a["alert"].lower() not in headings]
    assert not missing, f"docs/monitoring.md has no section for {missing}"


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fired, quiet = set(), set()
    for t in tests["tests"]:
        for case in t["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in observability.alert_rules()}
    assert names <= fired and names <= quiet, (names - fired, names - quiet)


@pytest.mark.server  # promtool is a process
def test_promtool_check_and_test_rules():
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([tool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_is_a_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
    ids, titles = [], []
    for p in _panels(dash["panels"]):
        ids.append(p["id"])
        if p["type"] == "row":
            titles.append(p["title"])
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t.get("expr") and t.get("refId") for t in p["targets"]), \
            p["title"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert len(titles) >= 7
    # every serving panel can be filtered by the model variable
    for e in observability.dashboard_exprs(dash):
        if re.search(r"ray_mlops_(serve|live|rollout|predlog)_", e) and "batch_rows" not in e \
                and not e.startswith("label_values"):
            assert 'model=~"$model"' in e, e
        if "ray_mlops_features_" in e and not e.startswith("label_values"):
            assert 'project=~"$project"' in e, e


def test_kuberay_manifests_embed_the_shipped_files():
    gen = runpy.run_path(str(REPO / "tools" / "gen_observability.py"))
    for path, text in gen["render"]().items():
        assert path.read_text() == text, f"{path.name} is stale: python tools/gen_observability.py"
    cm = yaml.safe_load((REPO / "cluster/kuberay/grafana-dashboard-configmap.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"].values()) == [DASHBOARD.read_text()]
    rule = yaml.safe_load((REPO / "cluster/kuberay/prometheus-rules.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_install_dashboard(tmp_path):
    assert observability.install_dashboard(str(tmp_path)) is None  # no Ray dashboard there
    folder = tmp_path / "metrics" / "grafana" / "dashboards"
    folder.mkdir(parents=True)
    got = observability.install_dashboard(str(tmp_path))
    assert got == folder / observability.DASHBOARD_FILE
    assert got.read_text() == DASHBOARD.read_text()
    # where Ray's provisioning file points Grafana elsewhere, that folder
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    prov = tmp_path / "metrics" / "grafana" / "provisioning" / "dashboards"
    prov.mkdir(parents=True)
    (prov / "default.yml").write_text("apiVersion: 1\nproviders:\n  - name: Ray\n    folder: Ray"
                                      f"\n    type: file\n    options:\n      path: {moved}\n")
    assert observability.install_dashboard(str(tmp_path)) == moved / observability.DASHBOARD_FILE


def test_observability_module_imports_no_ray():
    """It runs where Ray is not installed or not started (docs tooling, CI lint)."""
    src = Path(observability.__file__).read_text()
    assert not re.search(r"^\s*(import ray|from ray)", src, re.MULTILINE)
