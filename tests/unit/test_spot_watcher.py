"""The spot watcher against a local HTTP server playing each cloud's metadata service."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlops_ray.cluster.spot_watcher import poll


class Metadata:
    """Answers like the cloud's metadata server; `notice` switches the interruption on."""

    def __init__(self):
        self.notice = False
        self.seen: list[tuple[str, str, dict]] = []
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                meta.seen.append((method, self.path, dict(self.headers)))
                code, body = meta.route(method, self.path, self.headers)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self):  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_PUT(self):  # noqa: N802
                self._answer("PUT")

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, headers) -> tuple[int, str]:
        if path == "/latest/api/token" and method == "PUT":
            return 200, "tok-1"
        if path == "/latest/meta-data/spot/instance-action":
            if headers.get("X-aws-ec2-metadata-token") != "tok-1":
                return 401, ""
            return (200, json.dumps({"action": "terminate", "time": "2030-01-01T00:02:00Z"})) \
                if self.notice else (404, "")
        if path == "/computeMetadata/v1/instance/preempted":
            if headers.get("Metadata-Flavor") != "Google":
                return 403, ""
            return 200, "TRUE" if self.notice else "FALSE"
        if path.startswith("/metadata/scheduledevents"):
            events = [{"EventType": "Preempt", "NotBefore": "Tue, 01 Jan 2030 00:00:30 GMT"}] \
                if self.notice else [{"EventType": "Reboot", "NotBefore": ""}]
            return 200, json.dumps({"Events": events})
        return 404, ""


@pytest.fixture
def metadata():
    m = Metadata()
    yield m
    m.server.shutdown()


@pytest.mark.parametrize("provider, deadline, says", [
    ("aws", 120.0, "terminate at 2030-01-01T00:02:00Z"),
    ("gcp", 30.0, "gcp instance preempted"),
    ("azure", 30.0, "not before Tue, 01 Jan 2030 00:00:30 GMT"),
])
def test_notice_is_seen_with_its_deadline(metadata, provider, deadline, says):
    now = 1893456000.0  # 2030-01-01T00:00:00Z
    assert poll(provider, metadata.url, now=now) is None
    metadata.notice = True
    notice = poll(provider, metadata.url, now=now)
    assert notice is not None and notice.deadline_s == deadline and says in notice.message


def test_aws_uses_imdsv2_tokens(metadata):
    metadata.notice = True
    poll("aws", metadata.url, now=0)
    put, get = metadata.seen[0], metadata.seen[1]
    assert put[:2] == ("PUT", "/latest/api/token")
    assert {k.lower(): v for k, v in get[2].items()}["x-aws-ec2-metadata-token"] == "tok-1"
