"""LRU response cache with a TTL (no Ray). Keys include the model version, so a rollout never
answers from another version's entries."""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any


def key_of(version: str, records: list[dict[str, Any]]) -> str:
    """Canonical form: key order and int/float spelling of numbers do not matter."""
    canon = [{k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
              for k, v in sorted(r.items())} for r in records]
    return version + "|" + json.dumps(canon, separators=(",", ":"))


class TTLCache:
    def __init__(self, max_entries: int, ttl_s: float):
        self.max, self.ttl = max_entries, ttl_s
        self.data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> Any | None:
        item = self.data.get(key)
        if item is None or time.monotonic() - item[0] > self.ttl:
            if item is not None:
                del self.data[key]
            self.misses += 1
            return None
        self.data.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: Any) -> None:
        self.data[key] = (time.monotonic(), value)
        self.data.move_to_end(key)
        while len(self.data) > self.max:
            self.data.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.data), "hits": self.hits, "misses": self.misses}
