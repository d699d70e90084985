"""Derive the shipped entity-keyed example (`dataset=adult_people`) from the shipped Adult table.

Each Adult row becomes a person (`person_id` = row number) whose label is known at an event time
in 2024. Its features live in three feature-view sources with event and created timestamps:

- person_profile: age, fnlwgt, education, education_num, marital_status, relationship, race,
  sex, native_country; one value per person, known since 2023-01-01.
- person_work: workclass, occupation, hours_per_week; fed by the stream too.
- person_finance: capital_gain, capital_loss; fed by the stream too.

The work and finance values change over time. For every person, the value valid at the label's
event time is the Adult row's own value. The decoys are values a correct point-in-time join
must not use:
- older values (superseded before the event time);
- future values (event time after the label);
- late values: an event time before the label, but created (known) only after it.

So the known answer of the leakage-proof join is the Adult table itself, row for row. A join
that takes the latest value, or that ignores when a value became known, does not return it.

    .venv/bin/python tools/gen_adult_people.py     # rewrites mlops_ray/data/builtin/adult_people*.parquet
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BUILTIN = Path(__file__).resolve().parents[1] / "mlops_ray" / "data" / "builtin"
DAY = pd.Timedelta(days=1)
T_PROFILE = pd.Timestamp("2023-01-01", tz="UTC")
PROFILE = ["age", "fnlwgt", "education", "education_num", "marital_status", "relationship",
           "race", "sex", "native_country"]
WORK = ["workclass", "occupation", "hours_per_week"]
FINANCE = ["capital_gain", "capital_loss"]


def _decoy(col: pd.Series, rng: np.random.Generator) -> pd.Series:
    """Other values of the same column (a shuffled copy), so decoys look like real data."""
    return pd.Series(rng.permutation(col.to_numpy()), index=col.index)


def _history(adult: pd.DataFrame, cols: list[str], t_label: pd.Series,
             rng: np.random.Generator) -> pd.DataFrame:
    n = len(adult)
    pid = adult.index.to_numpy()
    # the value valid at the label: set 1-60 days before it, known at once
    t_true = t_label - pd.to_timedelta(rng.integers(1, 61, n), unit="D")
    parts = [pd.DataFrame({"person_id": pid, "event_timestamp": t_true, "created": t_true,
                           **{c: adult[c] for c in cols}})]
    masks = {"older": rng.random(n) < 0.5, "future": rng.random(n) < 0.3,
             "late": rng.random(n) < 0.2}
    for kind, m in masks.items():
        sub = adult[m]
        tl, tt = t_label[m], t_true[m]
        if kind == "older":  # superseded: 100-400 days before the true value
            ev = tt - pd.to_timedelta(rng.integers(100, 401, m.sum()), unit="D")
            cr = ev
        elif kind == "future":  # after the label: a join must never see it
            ev = tl + pd.to_timedelta(rng.integers(1, 200, m.sum()), unit="D")
            cr = ev
        else:  # a backfill: valid (by event time) before the label, known only after it
            ev = tl - pd.Timedelta(hours=12)
            cr = tl + pd.to_timedelta(rng.integers(1, 31, m.sum()), unit="D")
        parts.append(pd.DataFrame({"person_id": sub.index.to_numpy(), "event_timestamp": ev,
                                   "created": cr,
                                   **{c: _decoy(adult[c], rng)[m] for c in cols}}))
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["person_id", "event_timestamp"], kind="stable").reset_index(drop=True)


def build(adult: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    adult = adult.reset_index(drop=True)
    adult.index.name = "person_id"
    n = len(adult)
    t_label = pd.Series(pd.Timestamp("2024-01-01", tz="UTC")
                        + pd.to_timedelta(rng.integers(0, 366 * 24, n), unit="h"),
                        index=adult.index)
    entity = pd.DataFrame({"person_id": adult.index.to_numpy(),
                           "event_timestamp": t_label.to_numpy(),
                           "income": adult["income"], "uci_split": adult["uci_split"]})
    profile = pd.DataFrame({"person_id": adult.index.to_numpy(), "event_timestamp": T_PROFILE,
                            "created": T_PROFILE, **{c: adult[c] for c in PROFILE}})
    return {"adult_people": entity.reset_index(drop=True),
            "adult_people_profile": profile.reset_index(drop=True),
            "adult_people_work": _history(adult, WORK, t_label, rng),
            "adult_people_finance": _history(adult, FINANCE, t_label, rng)}


def main() -> None:
    adult = pd.read_parquet(BUILTIN / "adult.parquet")
    for name, df in build(adult).items():
        for c in ("event_timestamp", "created"):
            if c in df:
                df[c] = df[c].astype("datetime64[us, UTC]")
        df.to_parquet(BUILTIN / f"{name}.parquet", index=False)
        print(f"{name}: {len(df)} rows -> {BUILTIN / name}.parquet")


if __name__ == "__main__":
    main()
