"""The repository's tables, as SQLAlchemy 2 mappings. One schema for SQLite and PostgreSQL;
Alembic's migrations (`migrations/`) create and change it, never `create_all`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Constraint names fixed by convention, so that migrations name them the same on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# SQLite's INTEGER PRIMARY KEY is its rowid (a BIGINT primary key would not autoincrement).
Id = BigInteger().with_variant(Integer(), "sqlite")


def now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp read back in UTC on every database (SQLite keeps no time zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)  # PostgreSQL's are in the session's TimeZone


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    requirements: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=now)
    created_by: Mapped[str] = mapped_column(String(255))
    # The highest version number ever given, so that a deleted version's is not reused.
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    versions: Mapped[list[Version]] = relationship(back_populates="model")
    aliases: Mapped[list[Alias]] = relationship(back_populates="model")


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=now)
    created_by: Mapped[str] = mapped_column(String(255))

    model: Mapped[Model] = relationship(back_populates="versions")
    variants: Mapped[list[Variant]] = relationship(
        back_populates="version", cascade="all, delete-orphan"
    )


class Variant(Base):
    """One artifact of a version for one (runtime, precision, target profile)."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "runtime", "precision", "profile"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    runtime: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(16))
    profile: Mapped[str] = mapped_column(String(63))
    digest: Mapped[str] = mapped_column(String(71))  # sha256:<64 hex>
    size: Mapped[int] = mapped_column(BigInteger)
    # "file": the artifact is the model file itself, named `filename` in a version directory;
    # "tar": a tar archive of the version directory's files (OpenVINO's .xml and .bin, say).
    format: Mapped[str] = mapped_column(String(8))
    filename: Mapped[str] = mapped_column(String(255))
    benchmarks: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # profile -> results
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the verification report
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=now)
    created_by: Mapped[str] = mapped_column(String(255))

    version: Mapped[Version] = relationship(back_populates="variants")

    @property
    def verified(self) -> bool:
        """A passing verification report for this very artifact's digest."""
        report = self.report
        return bool(report and report.get("passed") is True and report.get("digest") == self.digest)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    name: Mapped[str] = mapped_column(String(63))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=now)

    model: Mapped[Model] = relationship(back_populates="aliases")
    version: Mapped[Version] = relationship()


class Event(Base):
    """The append-only log: who changed what, and when. Its id is the watch stream's cursor."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=now)
    actor: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(63), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
