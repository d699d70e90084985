"""The spot watcher against a local HTTP server playing each cloud's metadata service."""
from __future__ import annotations

import pytest

from mlops_ray.cluster.rehearsal import FakeMetadata
from mlops_ray.cluster.spot_watcher import poll


@pytest.fixture
def metadata():
    m = FakeMetadata()
    yield m
    m.close()


@pytest.mark.parametrize("provider, deadline, says", [
    ("aws", 120.0, "terminate at 2030-01-01T00:02:00Z"),
    ("gcp", 30.0, "gcp instance preempted"),
    ("azure", 30.0, "not before Tue, 01 Jan 2030 00:00:30 GMT"),
])
def test_notice_is_seen_with_its_deadline(metadata, provider, deadline, says):
    now = 1893456000.0  # 2030-01-01T00:00:00Z
    assert poll(provider, metadata.url, now=now) is None
    metadata.notice = now + deadline  # the interruption, `deadline` s from `now`
    notice = poll(provider, metadata.url, now=now)
    assert notice is not None and notice.deadline_s == deadline and says in notice.message


def test_aws_uses_imdsv2_tokens(metadata):
    metadata.notify(120)
    poll("aws", metadata.url, now=0)
    put, get = metadata.seen[0], metadata.seen[1]
    assert put[:2] == ("PUT", "/latest/api/token")
    assert {k.lower(): v for k, v in get[2].items()}["x-aws-ec2-metadata-token"] == "tok-1"
