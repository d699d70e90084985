"""The online store at scale: Redis (a redis-server this session starts on 127.0.0.1). The same
store config with `online.type=redis` materializes, answers the ingress's lookup, and gives
the vectors the offline point-in-time join gives at the same time (no skew)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.features.online import OnlineLookup, entity_spec

pytestmark = pytest.mark.server


def test_redis_online_store_serves_what_the_offline_join_gives(tmp_path, redis_server):
    t = pd.Timestamp("2024-03-01", tz="UTC")
    rows = []
    for k in range(30):  # two values per key; the later one is current
        rows.append((k, t, t, float(k), f"c{k % 3}"))
        rows.append((k, t + pd.Timedelta(days=k + 1), t + pd.Timedelta(days=k + 1),
                     float(100 + k), f"c{(k + 1) % 3}"))
    src = pd.DataFrame(rows, columns=["k", "event_timestamp", "created", "x", "c"])
    for col in ("event_timestamp", "created"):
        src[col] = src[col].astype("datetime64[us, UTC]")
    src.to_parquet(tmp_path / "src.parquet", index=False)
    cfg = FeastCfg.model_validate({
        "project": "redis_check", "entity": "k", "join_key": "k",
        "views": [{"name": "v", "source": str(tmp_path / "src.parquet"), "features": ["x", "c"]}],
        "online": {"type": "redis", "connection_string": f"127.0.0.1:{redis_server}"},
        "path": str(tmp_path / "store")})
    repo = FeatureRepo(cfg)
    repo.materialize()
    look = OnlineLookup(entity_spec(cfg.plain(), str(repo.root), ["x", "c"]))
    keys = list(range(30))
    online = pd.DataFrame(look.lookup(keys))
    offline = repo.training_frame(pd.DataFrame({"k": keys, "event_timestamp": pd.Timestamp.now(
        tz="UTC")}))
    np.testing.assert_array_equal(online["x"].to_numpy(float), offline["x"].to_numpy(float))
    assert online["c"].tolist() == offline["c"].tolist()
    assert online["x"].tolist() == [100.0 + k for k in keys]  # the current values
    # the join at an earlier time sees the earlier values; the online store only the latest
    early = repo.training_frame(pd.DataFrame({"k": keys, "event_timestamp": t}))
    assert early["x"].tolist() == [float(k) for k in keys]
    with pytest.raises(Exception, match="unknown entity"):
        look.lookup([999])
