"""The metadata store: every change is one transaction, and writes its event in it.

Synchronous SQLAlchemy; the API calls it from worker threads. SQLite (the default) takes
its write lock when a transaction begins (BEGIN IMMEDIATE), so that concurrent writers queue
instead of failing halfway; on PostgreSQL, new versions of one model queue on the model's
row lock. The alias compare-and-set is a conditional UPDATE, atomic on both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from kapi.core.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from kapi.core.hardware import can_run
from kapi.repository import entities as ent
from kapi.repository.schema import Alias, Event, Model, Variant, Version

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
PRODUCTION = "production"
_NUMBER_RETRIES = 5
_EVENTS_LOCK = 0x6B617069  # the advisory lock that orders events on PostgreSQL ("kapi")


def connect(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None  # transactions are SQLAlchemy's, begun below
            dbapi.execute("PRAGMA journal_mode=WAL")
            dbapi.execute("PRAGMA foreign_keys=ON")
            dbapi.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class MetadataStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.on_commit: list[Callable[[], None]] = []  # told after a change commits

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session
        for listener in self.on_commit:
            listener()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    # models

    def create_model(self, actor: str, spec: ent.ModelCreate) -> ent.ModelOut:
        try:
            with self._write() as session:
                model = Model(
                    name=spec.name,
                    description=spec.description,
                    signature=spec.signature.model_dump() if spec.signature else None,
                    requirements=spec.requirements,
                    created_by=actor,
                )
                session.add(model)
                session.flush()
                _log(session, actor, "model.created", spec.name, None, {})
        except IntegrityError:
            raise Conflict(f"model '{spec.name}' exists already") from None
        return self.get_model(spec.name)

    def list_models(self, allowed: Callable[[str], bool] = lambda _: True) -> list[ent.ModelOut]:
        with self._read() as session:
            models = session.scalars(select(Model).order_by(Model.name)).all()
            return [_model_out(session, m) for m in models if allowed(m.name)]

    def get_model(self, name: str) -> ent.ModelOut:
        with self._read() as session:
            return _model_out(session, _model(session, name))

    # versions

    def create_version(self, actor: str, name: str, spec: ent.VersionCreate) -> ent.VersionOut:
        for attempt in range(_NUMBER_RETRIES):
            try:
                with self._write() as session:
                    # Locked: PostgreSQL's concurrent writers queue here (SQLite's already
                    # do, at BEGIN IMMEDIATE) rather than all taking the same number.
                    model = _model(session, name, lock=True)
                    # Numbers are never reused: a deleted version's number stays its own.
                    number = model.last_version + 1
                    model.last_version = number
                    session.add(
                        Version(
                            model_id=model.id,
                            number=number,
                            lineage=spec.lineage,
                            metrics=spec.metrics,
                            created_by=actor,
                        )
                    )
                    session.flush()
                    _log(session, actor, "version.created", name, number, {})
                return self.get_version(name, number)
            except IntegrityError:  # another writer took the number (PostgreSQL)
                log.info("version number taken, retrying", extra={"attempt": attempt})
        raise Conflict(f"model '{name}': could not number a new version, try again")

    def list_versions(self, name: str) -> list[ent.VersionOut]:
        with self._read() as session:
            model = _model(session, name)
            versions = session.scalars(
                select(Version)
                .where(Version.model_id == model.id)
                .options(selectinload(Version.variants))
                .order_by(Version.number)
            ).all()
            return [_version_out(session, model, v) for v in versions]

    def get_version(self, name: str, number: int) -> ent.VersionOut:
        with self._read() as session:
            model = _model(session, name)
            return _version_out(session, model, _version(session, model, number))

    def delete_version(self, actor: str, name: str, number: int) -> list[str]:
        """Delete a version and its variants; returns the digests no variant uses any more
        (their blobs can go). Refused while an alias points at the version."""
        with self._write() as session:
            model = _model(session, name)
            version = _version(session, model, number)
            pointing = session.scalars(
                select(Alias.name).where(Alias.version_id == version.id)
            ).all()
            if pointing:
                raise Conflict(
                    f"model '{name}' version {number} cannot be deleted: aliases "
                    f"{sorted(pointing)} point at it; move them first"
                )
            digests = {variant.digest for variant in version.variants}
            session.delete(version)
            session.flush()
            used = set(
                session.scalars(select(Variant.digest).where(Variant.digest.in_(digests))).all()
            )
            _log(session, actor, "version.deleted", name, number, {})
        return sorted(digests - used)

    # variants

    def check_variant_free(self, name: str, number: int, key: tuple[str, str, str]) -> None:
        with self._read() as session:
            version = _version(session, _model(session, name), number)
            if _find_variant(version, key) is not None:
                raise Conflict(_variant_exists(name, number, key))

    def add_variant(
        self,
        actor: str,
        name: str,
        number: int,
        key: tuple[str, str, str],
        digest: str,
        size: int,
        fmt: str,
        filename: str,
    ) -> ent.VariantOut:
        runtime, precision, profile = key
        try:
            with self._write() as session:
                model = _model(session, name)
                version = _version(session, model, number)
                variant = Variant(
                    version_id=version.id,
                    runtime=runtime,
                    precision=precision,
                    profile=profile,
                    digest=digest,
                    size=size,
                    format=fmt,
                    filename=filename,
                    created_by=actor,
                )
                session.add(variant)
                session.flush()
                _log(
                    session,
                    actor,
                    "variant.uploaded",
                    name,
                    number,
                    {"variant": "/".join(key), "digest": digest, "size": size},
                )
        except IntegrityError:
            raise Conflict(_variant_exists(name, number, key)) from None
        return _variant_out(variant)

    def digest_used(self, digest: str) -> bool:
        with self._read() as session:
            return (
                session.scalar(select(Variant.id).where(Variant.digest == digest).limit(1))
                is not None
            )

    def get_variant(self, name: str, number: int, key: tuple[str, str, str]) -> ent.VariantOut:
        with self._read() as session:
            return _variant_out(_variant(session, name, number, key))

    def set_report(
        self, actor: str, name: str, number: int, key: tuple[str, str, str], report: ent.Report
    ) -> ent.VariantOut:
        with self._write() as session:
            variant = _variant(session, name, number, key)
            if report.digest != variant.digest:
                raise InvalidArgument(
                    f"the report judged {report.digest}, not this variant's artifact "
                    f"{variant.digest}; a report belongs to the artifact it checked"
                )
            variant.report = report.model_dump()
            _log(
                session,
                actor,
                "variant.report",
                name,
                number,
                {"variant": "/".join(key), "passed": report.passed, "digest": report.digest},
            )
            return _variant_out(variant)

    def set_benchmarks(
        self,
        actor: str,
        name: str,
        number: int,
        key: tuple[str, str, str],
        results: dict[str, Any],
    ) -> ent.VariantOut:
        with self._write() as session:
            variant = _variant(session, name, number, key)
            variant.benchmarks = {**variant.benchmarks, **results}
            _log(
                session,
                actor,
                "variant.benchmarks",
                name,
                number,
                {"variant": "/".join(key), "profiles": sorted(results)},
            )
            return _variant_out(variant)

    # aliases

    def set_alias(self, actor: str, name: str, alias: str, spec: ent.AliasSet) -> ent.ModelOut:
        """Point an alias at a version. The attempt is logged whether it succeeds or not."""
        ent.check_name("alias", alias)
        try:
            with self._write() as session:
                model = _model(session, name)
                version = _version(session, model, spec.version)
                if alias == PRODUCTION and not spec.force and not _verified(version):
                    raise FailedPrecondition(
                        f"model '{name}' version {spec.version} has no variant with a passing "
                        "verification report for its digest; verify it, or move "
                        f"'{PRODUCTION}' with force"
                    )
                current = session.scalar(
                    select(Alias).where(Alias.model_id == model.id, Alias.name == alias)
                )
                before = current.version.number if current else None
                _check_expected(name, alias, spec.expected_version, before)
                if current is None:
                    session.add(Alias(model_id=model.id, name=alias, version_id=version.id))
                    session.flush()  # a concurrent creation fails here, on the unique name
                else:
                    moved = session.execute(
                        update(Alias)
                        .where(Alias.id == current.id, Alias.version_id == current.version_id)
                        .values(version_id=version.id, updated_at=func.now())
                        .execution_options(synchronize_session=False)
                    )
                    if moved.rowcount != 1:  # type: ignore[attr-defined]
                        raise Conflict(f"alias '{alias}' of model '{name}' moved meanwhile")
                _log(
                    session,
                    actor,
                    "alias.moved",
                    name,
                    spec.version,
                    {"alias": alias, "from": before, "to": spec.version, "forced": spec.force},
                )
        except IntegrityError:
            error: Exception = Conflict(f"alias '{alias}' of model '{name}' was set meanwhile")
            self._log_rejected(actor, name, alias, spec, error)
            raise error from None
        except (Conflict, FailedPrecondition) as exc:
            self._log_rejected(actor, name, alias, spec, exc)
            raise
        return self.get_model(name)

    def _log_rejected(
        self, actor: str, name: str, alias: str, spec: ent.AliasSet, error: Exception
    ) -> None:
        with self._write() as session:
            _log(
                session,
                actor,
                "alias.rejected",
                name,
                spec.version,
                {"alias": alias, "to": spec.version, "forced": spec.force, "reason": str(error)},
            )

    def delete_alias(self, actor: str, name: str, alias: str) -> None:
        with self._write() as session:
            model = _model(session, name)
            current = session.scalar(
                select(Alias).where(Alias.model_id == model.id, Alias.name == alias)
            )
            if current is None:
                raise NotFound(f"model '{name}' has no alias '{alias}'")
            number = current.version.number
            session.execute(delete(Alias).where(Alias.id == current.id))
            _log(session, actor, "alias.deleted", name, number, {"alias": alias})

    # resolution

    def resolve(
        self, name: str, ref: str, profiles: Sequence[str], runtimes: Sequence[str]
    ) -> ent.Resolved:
        """The best variant of `name@ref` (an alias, a version number or `latest`) for a
        node with these profiles (best first) and runtimes: verified before unverified, then
        the fastest measured on the node's profiles, then the best profile."""
        with self._read() as session:
            model = _model(session, name)
            version = _version(session, model, _number_of(session, model, ref))
            ranked = []
            for variant in version.variants:
                rank = can_run(profiles, variant.profile, variant.runtime)
                if rank is None or variant.runtime not in runtimes:
                    continue
                ranked.append((not variant.verified, _latency(variant, profiles), rank, variant.id))
            if not ranked:
                raise NotFound(
                    f"model '{name}@{ref}' (version {version.number}) has no variant for "
                    f"profiles {list(profiles)} and runtimes {list(runtimes)}; it has "
                    f"{sorted(_key_text(v) for v in version.variants)}"
                )
            best = min(ranked)[-1]
            variant = next(v for v in version.variants if v.id == best)
            return ent.Resolved(
                model=_model_out(session, model),
                version=_version_out(session, model, version),
                variant=_variant_out(variant),
            )

    # events

    def cursor(self) -> int:
        with self._read() as session:
            return session.scalar(select(func.max(Event.id))) or 0

    def events(
        self,
        after: int = 0,
        model: str | None = None,
        limit: int = 500,
        models: frozenset[str] | None = None,
    ) -> list[ent.EventOut]:
        """Events after a cursor, of one model or of those in `models` (None: any)."""
        with self._read() as session:
            query = select(Event).where(Event.id > after).order_by(Event.id).limit(limit)
            if model is not None:
                query = query.where(Event.model == model)
            if models is not None:
                query = query.where(Event.model.in_(models))
            return [_event_out(e) for e in session.scalars(query).all()]


def _log(
    session: Session,
    actor: str,
    kind: str,
    model: str,
    version: int | None,
    detail: dict[str, Any],
) -> None:
    if session.get_bind().dialect.name == "postgresql":
        # Events must commit in id order, or a watcher past a later id skips an earlier one
        # that commits after it: writers take one lock, held to their commit, before their
        # event gets its id (SQLite's write lock does that already). Their other writes are
        # flushed first, so that no writer waits for a row while holding it.
        session.flush()
        session.execute(select(func.pg_advisory_xact_lock(_EVENTS_LOCK)))
    session.add(Event(actor=actor, kind=kind, model=model, version=version, detail=detail))


def _model(session: Session, name: str, lock: bool = False) -> Model:
    query = select(Model).where(Model.name == name)
    if lock:  # FOR NO KEY UPDATE: blocks other lockers, not inserts that refer to the row
        query = query.with_for_update(key_share=True)
    model = session.scalar(query)
    if model is None:
        raise NotFound(f"model '{name}' is not in the repository")
    return model


def _version(session: Session, model: Model, number: int) -> Version:
    version = session.scalar(
        select(Version)
        .where(Version.model_id == model.id, Version.number == number)
        .options(selectinload(Version.variants))
    )
    if version is None:
        raise NotFound(f"model '{model.name}' has no version {number}")
    return version


def _number_of(session: Session, model: Model, ref: str) -> int:
    if ref.isascii() and ref.isdigit():
        return int(ref)
    if ref == "latest":
        number = session.scalar(
            select(func.max(Version.number)).where(Version.model_id == model.id)
        )
        if number is None:
            raise NotFound(f"model '{model.name}' has no versions")
        return number
    alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == ref))
    if alias is None:
        raise NotFound(f"model '{model.name}' has no alias '{ref}'")
    return alias.version.number


def _find_variant(version: Version, key: tuple[str, str, str]) -> Variant | None:
    return next((v for v in version.variants if (v.runtime, v.precision, v.profile) == key), None)


def _variant(session: Session, name: str, number: int, key: tuple[str, str, str]) -> Variant:
    version = _version(session, _model(session, name), number)
    variant = _find_variant(version, key)
    if variant is None:
        raise NotFound(f"model '{name}' version {number} has no variant {'/'.join(key)}")
    return variant


def _variant_exists(name: str, number: int, key: tuple[str, str, str]) -> str:
    return (
        f"model '{name}' version {number} has a variant {'/'.join(key)} already; "
        "variants are immutable"
    )


def _check_expected(name: str, alias: str, expected: int | None, before: int | None) -> None:
    if expected is None or expected == (before or 0):
        return
    where = f"at version {before}" if before else "not set"
    raise Conflict(
        f"alias '{alias}' of model '{name}' is {where}, not at the version {expected} "
        "the move expected; read it again"
    )


def _verified(version: Version) -> bool:
    return any(v.verified for v in version.variants)


def _latency(variant: Variant, profiles: Sequence[str]) -> float:
    """The variant's measured latency on the first of the node's profiles it was measured on."""
    for profile in profiles:
        results = variant.benchmarks.get(profile)
        if isinstance(results, dict):
            for key in ("latency_p50_ms", "latency_p95_ms", "latency_ms"):
                value = results.get(key)
                if isinstance(value, int | float):
                    return float(value)
    return math.inf


def _key_text(variant: Variant) -> str:
    return f"{variant.runtime}/{variant.precision}/{variant.profile}"


def _aliases_of(session: Session, model: Model) -> dict[str, int]:
    rows = session.execute(
        select(Alias.name, Version.number)
        .join(Version, Alias.version_id == Version.id)
        .where(Alias.model_id == model.id)
    ).all()
    return dict(sorted((name, number) for name, number in rows))


def _model_out(session: Session, model: Model) -> ent.ModelOut:
    latest = session.scalar(select(func.max(Version.number)).where(Version.model_id == model.id))
    return ent.ModelOut(
        name=model.name,
        description=model.description,
        signature=ent.Signature.model_validate(model.signature) if model.signature else None,
        requirements=model.requirements,
        aliases=_aliases_of(session, model),
        latest_version=latest,
        created_at=model.created_at,
        created_by=model.created_by,
    )


def _version_out(session: Session, model: Model, version: Version) -> ent.VersionOut:
    aliases = [
        name for name, number in _aliases_of(session, model).items() if number == version.number
    ]
    return ent.VersionOut(
        model=model.name,
        number=version.number,
        lineage=version.lineage,
        metrics=version.metrics,
        aliases=aliases,
        variants=[_variant_out(v) for v in sorted(version.variants, key=_key_text)],
        created_at=version.created_at,
        created_by=version.created_by,
    )


def _variant_out(variant: Variant) -> ent.VariantOut:
    return ent.VariantOut.model_validate(variant, from_attributes=True)


def _event_out(row: Event) -> ent.EventOut:
    return ent.EventOut.model_validate(row, from_attributes=True)
