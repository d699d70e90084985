"""Spot-interruption watcher: one process per worker node (the launcher YAMLs start it).

    python -m mlops_ray.cluster.spot_watcher --provider aws|gcp|azure [--endpoint URL]
        [--interval 2] [--address auto] [--node-id HEX] [--deadline-s N]

It polls the cloud's interruption notice and, when one appears, drains this Ray node with reason
PREEMPTION and the notice's deadline. Ray Train then sees a preemption, not a node failure: the
training loop's `ray.train.get_preemption_info()` lets it write a just-in-time checkpoint, the
retry is charged to `failure.max_preemption_failures`, and the autoscaler replaces the node.

    aws    IMDSv2: PUT /latest/api/token, GET /latest/meta-data/spot/instance-action
           (404 until AWS schedules the stop; then {"action": "terminate", "time": ISO-8601})
    gcp    GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google) -> TRUE/FALSE;
           GCE gives 30 s
    azure  GET /metadata/scheduledevents?api-version=2020-07-01 (Metadata: true) -> an event
           with EventType "Preempt" and NotBefore

`--endpoint` replaces the metadata server's base URL (tests point it at a local server).
"""
from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("mlops_ray.spot_watcher")

BASE = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
        "azure": "http://169.254.169.254"}
GCP_NOTICE_S = 30


@dataclass
class Notice:
    deadline_s: float  # seconds from now until the instance goes away
    message: str


# the metadata service is link-local: never through HTTP(S)_PROXY (a proxy would see, and could
# forge, the notices and tokens)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str], method: str = "GET", timeout: float = 2) -> str | None:
    if not url.startswith("http://"):
        raise ValueError(f"metadata URL {url!r}: only http:// is used")
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _DIRECT.open(req, timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def poll(provider: str, base: str, now: float | None = None) -> Notice | None:
    """One look at the metadata server: a Notice when an interruption is scheduled."""
    now = time.time() if now is None else now
    if provider == "aws":
        token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"},
                     method="PUT")
        body = _get(f"{base}/latest/meta-data/spot/instance-action",
                    {"X-aws-ec2-metadata-token": token or ""})
        if not body:
            return None
        d = json.loads(body)
        when = dt.datetime.fromisoformat(d["time"].replace("Z", "+00:00")).timestamp()
        return Notice(max(0.0, when - now), f"aws spot {d.get('action', 'interruption')} at "
                                             f"{d['time']}")
    if provider == "gcp":
        body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        if (body or "").strip().upper() == "TRUE":
            return Notice(GCP_NOTICE_S, "gcp instance preempted")
        return None
    if provider == "azure":
        body = _get(f"{base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
        for ev in (json.loads(body) if body else {}).get("Events", []):
            if ev.get("EventType") == "Preempt":
                nb = ev.get("NotBefore")
                when = email.utils.parsedate_to_datetime(nb).timestamp() if nb else now + 30
                return Notice(max(0.0, when - now), f"azure spot eviction not before {nb}")
        return None
    raise ValueError(f"provider={provider!r}: allowed aws, gcp, azure")


def drain(address: str, node_id: str, notice: Notice) -> None:
    """Ask the GCS to drain `node_id` with reason PREEMPTION (Ray's own drain API, as
    `ray drain-node` and autoscaler v2 call it)."""
    import ray
    from ray.core.generated import autoscaler_pb2
    gcs = ray._raylet.GcsClient(address=address)  # type: ignore[attr-defined]  # not in the .pyi
    deadline_ms = int(time.time() * 1000 + notice.deadline_s * 1000)
    reason = autoscaler_pb2.DrainNodeReason.Value(  # type: ignore[attr-defined]  # no stubs
        "DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, notice.message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"the GCS refused to drain node {node_id}: {why}")


def this_node_id(address: str) -> str:
    """The id of the Ray node on this machine (the watcher runs beside its raylet)."""
    import ray
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def watch(provider: str, base: str, address: str, node_id: str, interval: float,
          max_polls: int | None = None) -> Notice | None:
    """Poll until a notice comes (then drain and return it), or `max_polls` ran out."""
    n = 0
    while max_polls is None or n < max_polls:
        n += 1
        try:
            notice = poll(provider, base)
        except (OSError, ValueError) as e:  # metadata hiccups must not kill the watcher
            log.warning("metadata poll failed: %s", e)
            notice = None
        if notice is not None:
            log.warning("interruption notice: %s; draining node %s (deadline in %.0f s)",
                        notice.message, node_id, notice.deadline_s)
            drain(address, node_id, notice)
            return notice
        time.sleep(interval)
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mlops_ray.cluster.spot_watcher",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", required=True, choices=sorted(BASE))
    ap.add_argument("--endpoint", help="metadata server base URL (default: the cloud's)")
    ap.add_argument("--address", default="auto", help="Ray GCS address (default: auto)")
    ap.add_argument("--node-id", help="node to drain (default: this machine's Ray node)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ray._private import services
    address = services.canonicalize_bootstrap_address_or_die(args.address)
    node_id = args.node_id or this_node_id(address)
    log.info("watching %s interruption notices for node %s", args.provider, node_id)
    watch(args.provider, args.endpoint or BASE[args.provider], address, node_id, args.interval)


if __name__ == "__main__":
    main()
