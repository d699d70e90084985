"""A real Prometheus (Debian's package, 127.0.0.1, temp storage) scrapes the session's local Ray
with the shipped alert rules loaded: every series the rules and the dashboard use arrives, with
the catalog's tags, every rule loads and evaluates cleanly on Ray's real labels, and the
new-series alerts catch a first event. Also `install_dashboard` against the session's folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from mlops_ray import metrics, observability
from tests.conftest import free_port, stop_server, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.server]
TAG = "scrape-check"  # the value of every tag of what the recorder publishes


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def recorder(ray_2_cpus):
    """An actor that has recorded one sample of every catalog metric (and one canary rollback),
    alive until the test ends, so its core worker keeps exporting them."""
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self) -> int:
            from mlops_ray.metrics import metric, record_every_metric
            record_every_metric(TAG)
            metric("mlops_rollout_events").inc(1, tags={"model": TAG, "outcome": "rolled_back"})
            return os.getpid()

    actor = Recorder.remote()
    pid = ray.get(actor.record.remote(), timeout=60)
    try:
        yield pid
    finally:
        ray.kill(actor)


@pytest.fixture
def prometheus(ray_2_cpus, tmp_path):
    """Prometheus scraping the session's Ray metrics agent every second, alerts.yml loaded;
    stopped by its pid."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found (Debian: apt-get install prometheus; .ci/run installs "
                    "it): the scrape of Ray by the alert rules' Prometheus was not tested")
    ray_port = os.environ["MLOPS_TEST_RAY_METRICS_PORT"]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(observability.ALERTS)],
        "scrape_configs": [{"job_name": "ray",
                            "static_configs": [{"targets": [f"127.0.0.1:{ray_port}"]}]}],
    }))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    try:
        wait_until(ready, 30, what="prometheus ready")
        yield url
    finally:
        stop_server(proc, timeout=20)
        log.close()


def test_prometheus_scraping_ray_finds_every_series_and_loads_every_rule(recorder, prometheus):
    expected = {n for name in metrics.CATALOG for n in metrics.exported_names(name)}
    rules_use = observability.rule_metric_names()
    assert rules_use <= expected and observability.dashboard_metric_names() <= expected
    match = urllib.parse.quote('{__name__=~"ray_mlops_.+"}')

    def missing() -> list[str]:
        """Catalog series not yet in Prometheus with the recorder's tags (Ray's own labels beside
        them). Names alone are not enough: earlier tests of the session export some of the same
        names with other tags, so a name can arrive before the recorder's series do."""
        series = _get(f"{prometheus}/api/v1/series?match[]={match}")["data"]
        return [f"{exported} tagged {spec.tags} = {TAG}"
                for name, spec in metrics.CATALOG.items()
                for exported in metrics.exported_names(name)
                if not any(s["__name__"] == exported and all(s.get(k) == TAG for k in spec.tags)
                           for s in series)]
    try:
        wait_until(lambda: not missing(), 60, interval=0.5,
                   what="every catalog series, tagged, in Prometheus")
    except AssertionError:
        got = set(_get(f"{prometheus}/api/v1/label/__name__/values?match[]={match}")["data"])
        raise AssertionError(f"rules use, Prometheus lacks: {sorted(rules_use - got)}; "
                             f"catalog, lacks: {sorted(expected - got)}; "
                             f"not yet tagged: {missing()}") from None

    # every alert loaded; each evaluates without error on the real series
    alerts = {r["alert"] for r in observability.alert_rules()}

    def rules() -> dict[str, dict] | None:
        groups = _get(f"{prometheus}/api/v1/rules?type=alert")["data"]["groups"]
        got = {r["name"]: r for g in groups for r in g["rules"]}
        return got if set(got) == alerts and all(r["health"] != "unknown"
                                                 for r in got.values()) else None
    loaded = wait_until(rules, 30, interval=0.5, what="every alert rule loaded and evaluated")
    assert {n: r["health"] for n, r in loaded.items()} == dict.fromkeys(alerts, "ok"), \
        {n: r.get("lastError") for n, r in loaded.items()}

    # on the recorder's samples (gauges at 1, counters new at 1): drift is flagged (pending
    # for 10 minutes), and the first rollback and the first dropped rows alert at once,
    # though their counters were never seen at 0; nothing else does
    want = {("MlopsFeatureDrift", "pending"), ("MlopsCanaryRolledBack", "firing"),
            ("MlopsPredictionLogDropping", "firing")}

    def states() -> set[tuple[str, str]] | None:
        got = {(a["labels"]["alertname"], a["state"])
               for a in _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
               if a["labels"].get("model") == TAG}
        return got if got == want else None
    try:
        wait_until(states, 30, interval=0.5, what="the recorder's alerts")
    except AssertionError:
        raise AssertionError(_get(f"{prometheus}/api/v1/alerts")["data"]) from None


def test_install_dashboard_on_the_session(ray_2_cpus, tmp_path):
    """The session's Ray runs without its dashboard (include_dashboard=False), so Ray wrote no
    Grafana folder and install_dashboard declines; with one (as Ray's dashboard writes it,
    checked by hand on a local Ray 2.60 with its dashboard) it copies the dashboard there."""
    import ray
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir()
    assert not (session / "metrics" / "grafana").exists()
    assert observability.install_dashboard(str(session)) is None

    folder = tmp_path / "metrics" / "grafana" / "dashboards"
    folder.mkdir(parents=True)
    prov = tmp_path / "metrics" / "grafana" / "provisioning" / "dashboards"
    prov.mkdir(parents=True)
    (prov / "default.yml").write_text(  # what Ray 2.60's dashboard writes (templates.py)
        "\napiVersion: 1\n\nproviders:\n  - name: Ray    # Default dashboards provided by OSS Ray\n"
        f"    folder: Ray\n    type: file\n    options:\n      path: {folder}\n")
    got = observability.install_dashboard(str(tmp_path))
    assert got == folder / observability.DASHBOARD_FILE
    assert json.loads(got.read_text())["uid"] == "mlops-ray"
