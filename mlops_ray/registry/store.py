"""The model registry: versions, aliases (compare-and-swap), lineage and the audit chain.

Every write runs in one transaction that first takes the registry's write lock (SQLite: BEGIN
IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so version numbers, alias moves and
the audit chain are serialised across processes and hosts. Alias moves are compare-and-swap: the
caller says which version it expects the alias to hold; if it moved since, RegistryConflict and
nothing is written. Roles are checked here, not in the jobs, so no entry point can skip them;
every denial is itself audited.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mlops_ray.errors import PermissionDenied, RegistryConflict, RegistryError, UnsafeArtifact
from mlops_ray.registry import artifact, audit, signing
from mlops_ray.registry import schema as S
from mlops_ray.registry.policy import Policy, stored_policy
from mlops_ray.registry.version import Version, check_name, parse_ref
from mlops_ray.storage import Storage

ANY = object()  # set_alias(expected=ANY): no compare-and-swap check


class _Deny(Exception):
    def __init__(self, message: str, **audit: Any):
        super().__init__(message)
        self.audit = audit


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 120})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
            dbapi_conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            # writes take the lock up front, so two writers never deadlock upgrading a read lock
            write = conn.get_execution_options().get("registry_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True)
    except ImportError as e:
        raise RegistryError(f"db.url={url.split('@')[-1]!r}: the database driver is not "
                            f"installed ({e}); for PostgreSQL: pip install 'psycopg[binary]'") \
            from None


class Registry:
    def __init__(self, url: str, storage: Storage, policy: Policy | None = None,
                 actor: str | None = None):
        self.url, self.storage = url, storage
        given = policy or Policy.default()
        self.key = signing.key_for(url)
        self.engine = make_engine(url)
        try:
            with self._write() as conn:
                S.migrate(conn)
                self.policy = stored_policy(conn, given, actor, self.key)
        except sa.exc.OperationalError as e:
            raise RegistryError(f"registry database {url.split('@')[-1]}: {e.orig}") from None
        self.actor = actor or self.policy.identity()

    def set_policy(self, new: Policy, reason: str | None = None) -> None:
        """Replace the stored policy (an admin under the policy in force)."""
        self._require("policy", "policy_set", reason=reason)
        with self._write() as conn:
            values = {"text": new.text(), "sha256": new.digest(), "set_by": self.actor,
                      "set_at": audit.now()}
            if conn.execute(sa.select(S.policy)).first() is None:
                conn.execute(S.policy.insert().values(id=1, **values))
            else:
                conn.execute(S.policy.update().where(S.policy.c.id == 1).values(**values))
            self._append(conn, "policy_set", reason=reason,
                         details={"sha256": new.digest(), "source": new.source})
        self.policy = new

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.engine.connect().execution_options(registry_write=True) as conn, \
                conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(740425)"))
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def _append(self, conn: sa.Connection, action: str, outcome: str = "ok",
                **fields: Any) -> dict[str, Any]:
        return audit.append(conn, self.key, self.actor, action, outcome, **fields)

    def _deny(self, message: str, action: str, **fields: Any) -> None:
        with self._write() as conn:
            self._append(conn, action, "denied", reason=fields.pop("reason", None),
                         details={"denied": message, **fields.pop("details", {})}, **fields)
        raise PermissionDenied(message)

    def _require(self, need: str, action: str, **fields: Any) -> None:
        if not self.policy.allows(self.actor, need):
            from mlops_ray.registry.policy import NEEDS
            self._deny(f"'{self.actor}' (role: {self.policy.role_of(self.actor) or 'none'}, "
                       f"policy: {self.policy.source}) may not {action.replace('_', ' ')}"
                       f"{' ' + fields['model'] if fields.get('model') else ''}: it needs the "
                       f"{NEEDS[need]} role", action, **fields)

    def require(self, need: str, action: str, **fields: Any) -> None:
        """PermissionDenied (and an audited denial) unless the caller's role allows `need`;
        for components that act outside the registry (Serve traffic) before they act."""
        self._require(need, action, **fields)

    def _row(self, conn: sa.Connection, model: str, version: int) -> Any:
        row = conn.execute(sa.select(S.versions).where(S.versions.c.model == model,
                                                       S.versions.c.version == version)).first()
        if row is None:
            known = conn.execute(sa.select(sa.func.max(S.versions.c.version))
                                 .where(S.versions.c.model == model)).scalar()
            raise RegistryError(f"{model}:{version} is not registered" + (
                f" (latest version: {known})" if known else f" (no versions of '{model}')"))
        return row

    def _version(self, conn: sa.Connection, row: Any) -> Version:
        names = conn.execute(sa.select(S.aliases.c.alias).where(
            S.aliases.c.model == row.model, S.aliases.c.version == row.version)
            .order_by(S.aliases.c.alias)).scalars().all()
        d = dict(row._mapping)
        for k in ("code_version", "study", "metrics"):
            d[k] = json.loads(d[k]) if d[k] else ({} if k == "metrics" else None)
        return Version(**d, aliases=list(names))

    # ---------------------------------------------------------------- reads
    def models(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(S.versions.c.model, sa.func.count(),
                                          sa.func.max(S.versions.c.version))
                                .group_by(S.versions.c.model).order_by(S.versions.c.model)).all()
            out = []
            for model, n, latest in rows:
                al = dict(conn.execute(sa.select(S.aliases.c.alias, S.aliases.c.version)
                                       .where(S.aliases.c.model == model)).all())
                out.append({"model": model, "versions": n, "latest": latest, "aliases": al})
            return out

    def get(self, ref: str) -> Version:
        model, alias, version = parse_ref(ref)
        with self.engine.connect() as conn:
            if conn.execute(sa.select(S.versions.c.model).where(S.versions.c.model == model)
                            .limit(1)).first() is None:
                import difflib
                names = sorted(conn.execute(sa.select(S.versions.c.model).distinct())
                               .scalars().all())
                near = difflib.get_close_matches(model, names, n=1)
                raise RegistryError(f"{ref}: no model '{model}' is registered" + (
                    f" (did you mean '{near[0]}'?)" if near else "")
                    + f"; models: {names or 'none'}")
            if alias is not None:
                version = conn.execute(sa.select(S.aliases.c.version).where(
                    S.aliases.c.model == model, S.aliases.c.alias == alias)).scalar()
                if version is None:
                    known = conn.execute(sa.select(S.aliases.c.alias).where(
                        S.aliases.c.model == model)).scalars().all()
                    raise RegistryError(f"{model}@{alias}: no such alias (aliases of {model}: "
                                        f"{sorted(known) or 'none'})")
            elif version is None:
                version = conn.execute(sa.select(sa.func.max(S.versions.c.version))
                                       .where(S.versions.c.model == model)).scalar()
                if version is None:
                    raise RegistryError(f"no versions of '{model}' are registered")
            return self._version(conn, self._row(conn, model, version))

    def alias_target(self, model: str, alias: str) -> Version | None:
        try:
            return self.get(f"{model}@{alias}")
        except RegistryError:
            return None

    def aliases(self, model: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(S.aliases.c.alias, S.aliases.c.version)
                                     .where(S.aliases.c.model == model)).all())

    def versions(self, model: str) -> list[Version]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(S.versions).where(S.versions.c.model == model)
                                .order_by(S.versions.c.version)).all()
            return [self._version(conn, r) for r in rows]

    def lineage(self, data_version: str | None = None, run: str | None = None,
                config_hash: str | None = None) -> list[Version]:
        """Versions built from a dataset version (prefix ok), a run, or a config hash."""
        q = sa.select(S.versions)
        if data_version:
            q = q.where(S.versions.c.data_version.startswith(data_version))
        if run:
            q = q.where(sa.or_(S.versions.c.run_uri == run, S.versions.c.run_name == run))
        if config_hash:
            q = q.where(S.versions.c.config_hash == config_hash)
        with self.engine.connect() as conn:
            return [self._version(conn, r) for r in
                    conn.execute(q.order_by(S.versions.c.model, S.versions.c.version)).all()]

    def fetch(self, ref: str) -> tuple[Version, Path]:
        """(version, local folder) after checking every file against the content hash."""
        v = self.get(ref)
        if v.status == "deleted":
            raise RegistryError(f"{v.ref} was deleted; its artifact is gone")
        return v, artifact.fetch(v.artifact_uri, v.content_hash, self.storage)

    # ---------------------------------------------------------------- writes
    def register(self, model: str, files: dict[str, bytes], meta: dict[str, Any]) -> Version:
        """A new immutable version (or the existing one with identical content). Its gate
        verdict is read from its signed gate report, never taken from the caller; a model spec
        outside the builders' allowlist is refused (UnsafeArtifact), before anything is
        written."""
        check_name(model, "model name")
        self._require("register", "register", model=model)
        try:
            spec = json.loads(files["meta.json"])["model"]
        except (KeyError, ValueError, TypeError):
            spec = None
        from mlops_ray.models import unsafe_spec
        if (why := unsafe_spec(spec)) is not None:
            with self._write() as conn:
                self._append(conn, "register", "refused", model=model,
                             details={"refused": why, "run": meta.get("run_uri")})
            raise UnsafeArtifact(f"{model}: not registered: {why}")
        passed, champion_run, distrust = signing.verdict(files, meta, self.key)
        digest, uri = artifact.write(self.storage, model, files)  # complete before the row
        with self._write() as conn:
            row = conn.execute(sa.select(S.versions).where(
                S.versions.c.model == model, S.versions.c.content_hash == digest)).first()
            if row is not None:
                return self._version(conn, row)
            number = (conn.execute(sa.select(sa.func.max(S.versions.c.version))
                                   .where(S.versions.c.model == model)).scalar() or 0) + 1
            values = {
                "model": model, "version": number, "content_hash": digest, "artifact_uri": uri,
                "run_uri": meta.get("run_uri"), "run_name": meta.get("run_name"),
                "data_version": meta.get("data_version"), "dataset_uri": meta.get("dataset_uri"),
                "config_hash": meta.get("config_hash"),
                "code_version": json.dumps(meta.get("code_version"), sort_keys=True),
                "study": json.dumps(meta["study"], sort_keys=True) if meta.get("study") else None,
                "gate_passed": passed, "champion_run": champion_run,
                "metrics": json.dumps(meta.get("metrics") or {}, sort_keys=True),
                "status": "active", "created_at": audit.now(), "created_by": self.actor}
            conn.execute(S.versions.insert().values(**values))
            self._append(conn, "register", model=model, version=number,
                         verdict="passed" if values["gate_passed"] else "failed",
                         details={"content_hash": digest, "run": values["run_uri"],
                                  "data_version": values["data_version"],
                                  **({"report": distrust} if distrust else {})})
            return self._version(conn, self._row(conn, model, number))

    def set_alias(self, model: str, alias: str, version: int, *, expected: Any = ANY,
                  reason: str | None = None, force: bool = False) -> Version:
        """Point `alias` at `version` if it still holds `expected` (None: unset)."""
        check_name(alias, "alias")
        fields = {"model": model, "alias": alias, "to_version": version, "reason": reason}
        need = "production" if alias == "production" else "alias"
        self._require(need, f"move_{alias}", **fields)
        if force:
            self._require("force", f"force_{alias}", **fields)
            if not (reason or "").strip():
                self._deny(f"--force on {model}@{alias} needs a --reason", f"force_{alias}",
                           **fields)
        try:
            with self._write() as conn:
                row = self._row(conn, model, version)
                if row.status == "deleted":
                    raise RegistryError(f"{model}:{version} was deleted")
                cur = conn.execute(sa.select(S.aliases).where(S.aliases.c.model == model,
                                                              S.aliases.c.alias == alias)).first()
                held = cur.version if cur else None
                if expected is not ANY and held != expected:
                    raise RegistryConflict(
                        f"{model}@{alias} moved: expected {expected}, it now points at {held}; "
                        "nothing was changed (re-read and decide again)")
                if alias == "production" and not force:
                    if not row.gate_passed:
                        raise _Deny(f"{model}:{version} failed its validation gates; production "
                                    "can only point at a version whose gates passed (an admin may "
                                    "override with --force and a --reason)", verdict="failed")
                    if held is not None and held != version:
                        prod_run = self._row(conn, model, held).run_uri
                        if row.champion_run != prod_run:
                            raise _Deny(f"{model}:{version}'s champion gate compared against "
                                        f"{row.champion_run}, not the current production version "
                                        f"{model}:{held} (run {prod_run}); re-run jobs.promote so "
                                        "it is compared against production", verdict="failed")
                if cur is None:
                    conn.execute(S.aliases.insert().values(model=model, alias=alias,
                                                           version=version, generation=1))
                else:
                    done = conn.execute(S.aliases.update().where(
                        S.aliases.c.model == model, S.aliases.c.alias == alias,
                        S.aliases.c.generation == cur.generation).values(
                        version=version, generation=cur.generation + 1))
                    if done.rowcount != 1:  # cannot happen under the lock; belt and braces
                        raise RegistryConflict(f"{model}@{alias} moved during the update")
                conn.execute(S.alias_moves.insert().values(
                    model=model, alias=alias, from_version=held, to_version=version, kind="set"))
                self._append(conn, "force_alias" if force else "alias", model=model,
                             version=version, alias=alias, from_version=held, to_version=version,
                             reason=reason, verdict="passed" if row.gate_passed else "failed")
                return self._version(conn, row)
        except _Deny as d:
            self._deny(str(d), f"move_{alias}", **{**fields, **d.audit})
            raise AssertionError("unreachable") from None

    def rollback(self, model: str, alias: str = "production", reason: str | None = None
                 ) -> tuple[int, int]:
        """Move `alias` back to the version it held before its latest promotion."""
        fields = {"model": model, "alias": alias, "reason": reason}
        self._require("production" if alias == "production" else "alias", f"rollback_{alias}",
                      **fields)
        with self._write() as conn:
            moves = conn.execute(sa.select(S.alias_moves).where(
                S.alias_moves.c.model == model, S.alias_moves.c.alias == alias)
                .order_by(S.alias_moves.c.id)).all()
            stack: list[int] = []
            for m in moves:  # promotions push, rollbacks pop
                if m.kind == "set":
                    stack.append(m.to_version)
                elif stack:
                    stack.pop()
            if len(stack) < 2:
                raise RegistryError(f"{model}@{alias}: no earlier version to roll back to "
                                    f"(history: {[m.to_version for m in moves] or 'empty'})")
            cur, target = stack[-1], stack[-2]
            if self._row(conn, model, target).status == "deleted":
                raise RegistryError(f"{model}@{alias}: the previous version {target} was deleted")
            conn.execute(S.aliases.update().where(S.aliases.c.model == model,
                                                  S.aliases.c.alias == alias)
                         .values(version=target, generation=S.aliases.c.generation + 1))
            conn.execute(S.alias_moves.insert().values(model=model, alias=alias, from_version=cur,
                                                       to_version=target, kind="rollback"))
            self._append(conn, "rollback", model=model, version=target, alias=alias,
                         from_version=cur, to_version=target, reason=reason)
            return cur, target

    def delete(self, model: str, version: int, reason: str | None = None) -> None:
        """Admin only, never while an alias points at it; the row stays (lineage, audit), the
        artifact files go."""
        fields: dict[str, Any] = {"model": model, "version": version, "reason": reason}
        self._require("delete", "delete", **fields)
        try:
            with self._write() as conn:
                row = self._row(conn, model, version)
                held = [a for a, v in conn.execute(sa.select(S.aliases.c.alias,
                                                             S.aliases.c.version)
                        .where(S.aliases.c.model == model)).all() if v == version]
                if held:
                    raise _Deny(f"{model}:{version} is still aliased as {held}; move those "
                                "aliases first")
                conn.execute(S.versions.update().where(S.versions.c.model == model,
                                                       S.versions.c.version == version)
                             .values(status="deleted"))
                self._append(conn, "delete", **fields)
                uri = row.artifact_uri
        except _Deny as d:
            self._deny(str(d), "delete", **fields)
        if uri.startswith("file://"):
            import shutil
            shutil.rmtree(uri[len("file://"):], ignore_errors=True)
        else:
            self.storage.fs.delete_dir_contents(uri[len("s3://"):], missing_dir_ok=True)

    def mark_retrain(self, data_version: str, reason: str | None = None) -> list[Version]:
        """Erasure requests: every active version trained on `data_version` is marked."""
        self._require("retrain", "mark_retrain", reason=reason,
                      details={"data_version": data_version})
        marked = [v for v in self.lineage(data_version=data_version) if v.status == "active"]
        with self._write() as conn:
            for v in marked:
                conn.execute(S.versions.update().where(S.versions.c.model == v.model,
                                                       S.versions.c.version == v.version)
                             .values(status="retrain_requested"))
                self._append(conn, "mark_retrain", model=v.model, version=v.version,
                             reason=reason, details={"data_version": v.data_version})
        return [self.get(v.ref) for v in marked]

    def record(self, action: str, model: str, version: int | None = None, *, need: str = "deploy",
               **fields: Any) -> dict[str, Any]:
        """Append an event from another component (deployments, traffic changes, rollbacks on
        Serve) to the same audit chain."""
        self._require(need, action, model=model, version=version)
        with self._write() as conn:
            return self._append(conn, action, model=model, version=version, **fields)

    # ---------------------------------------------------------------- audit
    def audit_log(self, model: str | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return audit.records(conn, model)

    def verify_audit(self, records: list[dict[str, Any]] | None = None) -> list[str]:
        """Problems found in the chain ([] = intact): edited, deleted, reordered or inserted
        records, and a truncated tail (against the head row)."""
        if records is not None:
            return audit.verify(records, self.key)
        with self.engine.connect() as conn:
            recs = audit.records(conn)
            return audit.verify(recs, self.key, audit.head(conn)) + audit.replay(conn, recs)

    def export_audit(self, path: str | Path) -> int:
        recs = self.audit_log()
        tmp = Path(f"{path}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        tmp.replace(path)
        return len(recs)
