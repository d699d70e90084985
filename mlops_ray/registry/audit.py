"""The registry's audit chain: every register, alias move, rollback, deletion (attempt),
denial, deployment and traffic change is a record whose HMAC (the registry's key,
registry/signing.py) covers the record and the previous one's; a head row holds the count and
the last MAC, so an edited, inserted, deleted or truncated record is found by `verify`, and a
database writer without the key cannot recompute the chain. `replay` checks the log against
the tables: every version registered as recorded, every alias where its last move put it."""
from __future__ import annotations

import datetime as dt
import hmac
import json
from typing import Any

import sqlalchemy as sa

from mlops_ray.registry import schema as S

GENESIS = "0" * 64
AUDIT_FIELDS = ("seq", "ts", "actor", "action", "outcome", "model", "version", "alias",
                "from_version", "to_version", "reason", "verdict", "details", "prev_hash", "hash")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def hash_record(rec: dict[str, Any], key: bytes) -> str:
    body = {k: rec[k] for k in AUDIT_FIELDS if k != "hash"}
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":"),
                                    default=str).encode(), "sha256").hexdigest()


def append(conn: sa.Connection, key: bytes, actor: str, action: str, outcome: str = "ok",
           **fields: Any) -> dict[str, Any]:
    """Append a record (inside the caller's write transaction, which holds the lock)."""
    head_row = conn.execute(sa.select(S.audit_head)).first()
    # Row.count is typed as the tuple method; at runtime a column named "count" wins
    count, prev = (head_row._mapping["count"], head_row.hash) if head_row else (0, GENESIS)
    rec = {"seq": count + 1, "ts": now(), "actor": actor, "action": action,
           "outcome": outcome, "model": None, "version": None, "alias": None,
           "from_version": None, "to_version": None, "reason": None, "verdict": None,
           "details": None, "prev_hash": prev}
    for k, v in fields.items():
        rec[k] = json.dumps(v, sort_keys=True, default=str) if k == "details" and v else v
    rec["hash"] = hash_record({**rec, "hash": None}, key)
    conn.execute(S.audit.insert().values(**rec))
    if head_row:
        conn.execute(S.audit_head.update().where(S.audit_head.c.id == 1)
                     .values(count=rec["seq"], hash=rec["hash"]))
    else:
        conn.execute(S.audit_head.insert().values(id=1, count=1, hash=rec["hash"]))
    return rec


def records(conn: sa.Connection, model: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(S.audit).order_by(S.audit.c.seq)
    if model:
        q = q.where(S.audit.c.model == model)
    return [dict(r._mapping) for r in conn.execute(q).all()]


def head(conn: sa.Connection) -> tuple[int, str]:
    row = conn.execute(sa.select(S.audit_head)).first()
    return (row._mapping["count"], row.hash) if row else (0, GENESIS)


def verify(recs: list[dict[str, Any]], key: bytes, head_of: tuple[int, str] | None = None
           ) -> list[str]:
    """Problems in a chain of records ([] = intact); with the head row, a truncated tail too."""
    problems, prev = [], GENESIS
    for i, r in enumerate(recs, start=1):
        if r["seq"] != i:
            problems.append(f"record {i}: sequence number is {r['seq']} (a record is missing "
                            "or was inserted)")
        if r["prev_hash"] != prev:
            problems.append(f"record seq={r['seq']}: does not follow the previous record's "
                            "hash (chain broken)")
        if not hmac.compare_digest(hash_record(r, key), str(r["hash"])):
            problems.append(f"record seq={r['seq']}: content does not match its hash "
                            "(edited)")
        prev = r["hash"]
    if head_of is not None:
        count, last = head_of
        if count != len(recs) or (recs and last != recs[-1]["hash"]):
            problems.append(f"the log has {len(recs)} record(s) but the head says {count} "
                            "ending in a different hash (records removed from the end)")
    return problems


def replay(conn: sa.Connection, recs: list[dict[str, Any]]) -> list[str]:
    """Where the tables disagree with the log: a version without its register record (or with
    another content hash or verdict), an alias not where its last recorded move put it."""
    problems = []
    registered: dict[tuple[str, int], dict[str, Any]] = {}
    where: dict[tuple[str, str], int | None] = {}
    for r in recs:
        if r["outcome"] != "ok":
            continue
        if r["action"] == "register":
            registered[(r["model"], r["version"])] = r
        elif r["action"] in ("alias", "force_alias", "rollback") and r["alias"]:
            where[(r["model"], r["alias"])] = r["to_version"]
    for row in conn.execute(sa.select(S.versions)).all():
        rec = registered.pop((row.model, row.version), None)
        if rec is None:
            problems.append(f"{row.model}:{row.version} is in the versions table but was never "
                            "registered in the log (inserted)")
            continue
        details = json.loads(rec["details"] or "{}")
        if details.get("content_hash") != row.content_hash:
            problems.append(f"{row.model}:{row.version}: its content hash differs from the one "
                            "registered (edited)")
        if (rec["verdict"] == "passed") != bool(row.gate_passed):
            problems.append(f"{row.model}:{row.version}: gate_passed differs from the verdict "
                            "registered (edited)")
    problems += [f"{m}:{v} was registered but is missing from the versions table (deleted)"
                 for m, v in registered]
    for row in conn.execute(sa.select(S.aliases)).all():
        want = where.pop((row.model, row.alias), None)
        if want != row.version:
            problems.append(f"{row.model}@{row.alias} points at {row.version} but its last "
                            f"recorded move put it at {want} (edited)")
    problems += [f"{m}@{a} was moved in the log but is missing from the aliases table"
                 for (m, a) in where]
    return problems
