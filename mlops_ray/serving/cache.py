"""LRU response cache with a TTL, bounded in entries and bytes (no Ray). A key is the SHA-256 of
the model version and the canonical request, so a rollout never answers from another version's
entries and a large request costs 64 bytes of key."""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any


def key_of(version: str, records: list[dict[str, Any]]) -> str:
    """Canonical form: key order and int/float spelling of numbers do not matter."""
    canon = [{k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
              for k, v in sorted(r.items())} for r in records]
    return hashlib.sha256((version + "|" + json.dumps(canon, separators=(",", ":")))
                          .encode()).hexdigest()


class TTLCache:
    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int = 64 * 1024 * 1024):
        self.max, self.ttl, self.max_bytes = max_entries, ttl_s, max_bytes
        self.data: OrderedDict[str, tuple[float, Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def _drop(self, key: str) -> None:
        self.bytes -= self.data.pop(key)[2]

    def get(self, key: str) -> Any | None:
        item = self.data.get(key)
        if item is None or time.monotonic() - item[0] > self.ttl:
            if item is not None:
                self._drop(key)
            self.misses += 1
            return None
        self.data.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: Any) -> None:
        size = len(key) + len(json.dumps(value, separators=(",", ":")))
        if size > self.max_bytes:
            return
        if key in self.data:
            self._drop(key)
        self.data[key] = (time.monotonic(), value, size)
        self.bytes += size
        while len(self.data) > self.max or self.bytes > self.max_bytes:
            self._drop(next(iter(self.data)))

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.data), "bytes": self.bytes, "hits": self.hits,
                "misses": self.misses}
