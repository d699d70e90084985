"""Registry tables and their versioned migrations (no Ray, no Hydra).

Migrations are an explicit ordered list: `registry_schema` holds the version a database is at;
`migrate()` applies the missing steps in one transaction under the registry's write lock, so two
processes opening a new database at once cannot both create it. A database newer than this code
is refused rather than written by code that does not know its columns.
"""
from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from mlops_ray.errors import RegistryError

meta = sa.MetaData()

schema_version = sa.Table(
    "registry_schema", meta,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("version", sa.Integer, nullable=False),
)

versions = sa.Table(
    "registry_versions", meta,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("run_uri", sa.Text),
    sa.Column("run_name", sa.String(256)),
    sa.Column("data_version", sa.String(64), index=True),
    sa.Column("dataset_uri", sa.Text),
    sa.Column("config_hash", sa.String(64), index=True),
    sa.Column("code_version", sa.Text),  # JSON
    sa.Column("study", sa.Text),  # JSON: the tuning study the run came from, or null
    sa.Column("gate_passed", sa.Boolean, nullable=False),
    sa.Column("champion_run", sa.Text),  # the run the champion gate compared against
    sa.Column("metrics", sa.Text),  # JSON: headline metrics of the gate report
    sa.Column("status", sa.String(32), nullable=False),  # active | deleted | retrain_requested
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.UniqueConstraint("model", "content_hash", name="uq_model_content"),
)

aliases = sa.Table(
    "registry_aliases", meta,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),  # +1 on every move: the CAS token
)

# every move of an alias, in order; rollback pops the stack of promotions it implies
alias_moves = sa.Table(
    "registry_alias_moves", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # set | rollback
    sa.Index("ix_moves_model_alias", "model", "alias"),
)

audit = sa.Table(
    "registry_audit", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # ok | denied
    sa.Column("model", sa.String(128)),
    sa.Column("version", sa.Integer),
    sa.Column("alias", sa.String(64)),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer),
    sa.Column("reason", sa.Text),
    sa.Column("verdict", sa.String(16)),  # passed | failed | null
    sa.Column("details", sa.Text),  # JSON
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# count and hash of the newest record, updated with each append: deleting the *last* record
# leaves the chain itself intact, this row does not
audit_head = sa.Table(
    "registry_audit_head", meta,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)


# the access policy, stored in the registry itself (so no job's config can swap or drop it);
# set by an admin with `jobs.registry policy set FILE`, or by the first job that names a file
policy = sa.Table(
    "registry_policy", meta,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("text", sa.Text, nullable=False),  # the YAML document
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("set_by", sa.String(128), nullable=False),
    sa.Column("set_at", sa.String(32), nullable=False),
)


def _v1(conn: sa.Connection) -> None:
    for t in (versions, aliases, alias_moves, audit, audit_head):
        t.create(conn, checkfirst=True)


def _v2(conn: sa.Connection) -> None:
    policy.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "versions, aliases with generation counters, alias moves, hash-chained audit", _v1),
    (2, "the access policy stored in the registry", _v2),
]
LATEST = MIGRATIONS[-1][0]


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    row = conn.execute(sa.select(schema_version.c.version)).first()
    return int(row[0]) if row else 0


def migrate(conn: sa.Connection) -> list[int]:
    """Bring the schema to LATEST inside the caller's (locked) transaction; returns steps run."""
    at = current_version(conn)
    if at > LATEST:
        raise RegistryError(f"the registry database is at schema version {at}, newer than this "
                            f"code knows ({LATEST}); upgrade mlops_ray before using it")
    if at == LATEST:
        return []
    schema_version.create(conn, checkfirst=True)
    done = []
    for number, _, step in MIGRATIONS:
        if number > at:
            step(conn)
            done.append(number)
    if at == 0:
        conn.execute(schema_version.insert().values(id=1, version=LATEST))
    else:
        conn.execute(schema_version.update().where(schema_version.c.id == 1)
                     .values(version=LATEST))
    return done
