"""The metadata store's contract, the same on SQLite and on PostgreSQL: migrations that match
the models, version numbering, variants, the alias compare-and-set, deletion, resolution and
the event log, each change one transaction that writes one event."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from kapi.core.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from kapi.repository import entities as ent
from kapi.repository.schema import Base
from kapi.repository.store import MIGRATIONS, MetadataStore, connect, migrate
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

T = TypeVar("T")
Key = tuple[str, str, str]

BACKENDS = ["sqlite", "postgresql"]
# The PostgreSQL databases run in a zone that is not UTC, so that the store is seen to hand
# back UTC whatever the server's TimeZone setting (+05:30, no daylight saving time).
SERVER_ZONE = "Asia/Kolkata"
TABLES = {"models", "versions", "variants", "aliases", "events"}
ACTOR = "tester"
THREADS = 8
ROUNDS = 3  # of the races that a lost race would fail only sometimes
CPU = ("onnxruntime", "fp32", "cpu-x86_64")
AVX2 = ("onnxruntime", "fp32", "cpu-x86_64-avx2")
# A node's profiles, best first: an avx2 node also runs baseline x86-64 variants.
NODE = ["cpu-x86_64-avx2", "cpu-x86_64"]
RUNTIMES = ["onnxruntime", "openvino"]


# fixtures


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: SQLite in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.db"
    url: str = request.getfixturevalue("postgres_database")
    _execute(url, f"ALTER DATABASE \"{make_url(url).database}\" SET timezone TO '{SERVER_ZONE}'")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The store's engine on the empty database (not migrated)."""
    engine = connect(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> MetadataStore:
    """A MetadataStore on a freshly migrated database."""
    migrate(engine)
    return MetadataStore(engine)


# helpers


def _execute(url: str, statement: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def model(store: MetadataStore, name: str = "resnet", actor: str = ACTOR) -> ent.ModelOut:
    return store.create_model(actor, ent.ModelCreate(name=name, description=f"the {name}"))


def version(store: MetadataStore, name: str = "resnet", actor: str = ACTOR) -> int:
    return store.create_version(actor, name, ent.VersionCreate()).number


def variant(
    store: MetadataStore,
    name: str,
    number: int,
    key: Key,
    artifact: str | None = None,
    actor: str = ACTOR,
) -> ent.VariantOut:
    """Adds a variant; its digest is that of `artifact` (default: one of its own)."""
    seed = artifact if artifact is not None else f"{name}/{number}/{'/'.join(key)}"
    return store.add_variant(actor, name, number, key, digest(seed), 1234, "file", "model.onnx")


def verify(store: MetadataStore, name: str, number: int, key: Key, passed: bool = True) -> None:
    judged = store.get_variant(name, number, key).digest
    store.set_report(ACTOR, name, number, key, ent.Report(passed=passed, digest=judged))


def latency(store: MetadataStore, name: str, number: int, key: Key, ms: float) -> None:
    store.set_benchmarks(ACTOR, name, number, key, {key[2]: {"latency_p50_ms": ms}})


def alias(
    store: MetadataStore,
    name: str,
    alias_name: str,
    number: int,
    *,
    force: bool = False,
    expected: int | None = None,
    actor: str = ACTOR,
) -> ent.ModelOut:
    spec = ent.AliasSet(version=number, force=force, expected_version=expected)
    return store.set_alias(actor, name, alias_name, spec)


def key_of(resolved: ent.Resolved) -> Key:
    found = resolved.variant
    return (found.runtime, found.precision, found.profile)


def race(count: int, attempt: Callable[[int], T]) -> list[T | Exception]:
    """Runs attempt(0..count-1) on `count` threads released together; each one's result or
    the exception it raised, in order."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T | Exception:
        barrier.wait(timeout=30)
        try:
            return attempt(index)
        except Exception as error:
            return error

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def kinds(events: list[ent.EventOut]) -> Counter[str]:
    return Counter(event.kind for event in events)


def is_utc(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


# migrations


def test_migrate_creates_the_schema_and_again_is_a_no_op(engine: Engine) -> None:
    assert inspect(engine).get_table_names() == []
    migrate(engine)
    assert set(inspect(engine).get_table_names()) == {*TABLES, "alembic_version"}
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    assert _current_revision(engine) == head

    store = MetadataStore(engine)
    model(store)
    version(store)
    cursor = store.cursor()
    migrate(engine)  # at head already: changes nothing, keeps the data
    assert _current_revision(engine) == head
    assert set(inspect(engine).get_table_names()) == {*TABLES, "alembic_version"}
    assert store.get_model("resnet").latest_version == 1
    assert store.cursor() == cursor


def test_the_migrations_and_the_models_agree(store: MetadataStore) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_upgrading_from_the_first_schema_keeps_version_numbers_going(engine: Engine) -> None:
    """0002 gives models a counter of version numbers, started from the versions there."""
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO models (id, name, description, created_at, created_by) "
                "VALUES (1, 'resnet', '', CURRENT_TIMESTAMP, 'old')"
            )
        )
        for number in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO versions (model_id, number, lineage, metrics, created_at, "
                    "created_by) VALUES (1, :n, '{}', '{}', CURRENT_TIMESTAMP, 'old')"
                ),
                {"n": number},
            )
    migrate(engine)
    assert version(MetadataStore(engine)) == 3


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# models


def test_create_model_and_get_it(store: MetadataStore) -> None:
    created = store.create_model(
        "alice", ent.ModelCreate(name="resnet", description="images", requirements={"a": 1})
    )
    assert created.name == "resnet"
    assert created.description == "images"
    assert created.requirements == {"a": 1}
    assert created.created_by == "alice"
    assert created.aliases == {}
    assert created.latest_version is None
    assert store.get_model("resnet") == created
    model(store, "bert")
    assert [m.name for m in store.list_models()] == ["bert", "resnet"]
    assert [m.name for m in store.list_models(lambda name: name != "bert")] == ["resnet"]


def test_a_duplicate_model_conflicts(store: MetadataStore) -> None:
    model(store)
    cursor = store.cursor()
    with pytest.raises(Conflict, match="resnet"):
        model(store)
    assert store.cursor() == cursor  # a failed change writes no event
    assert [m.name for m in store.list_models()] == ["resnet"]


def test_unknown_things_are_not_found(store: MetadataStore) -> None:
    with pytest.raises(NotFound):
        store.get_model("nope")
    with pytest.raises(NotFound):
        store.list_versions("nope")
    with pytest.raises(NotFound):
        store.create_version(ACTOR, "nope", ent.VersionCreate())
    model(store)
    with pytest.raises(NotFound):
        store.get_version("resnet", 1)
    version(store)
    with pytest.raises(NotFound):
        store.get_variant("resnet", 1, CPU)
    with pytest.raises(NotFound):
        store.check_variant_free("resnet", 2, CPU)
    with pytest.raises(NotFound):
        store.delete_version(ACTOR, "resnet", 2)
    with pytest.raises(NotFound):
        store.delete_alias(ACTOR, "resnet", "staging")
    with pytest.raises(NotFound):
        alias(store, "resnet", "staging", 2)


# versions


def test_versions_are_numbered_one_two_three(store: MetadataStore) -> None:
    model(store)
    first = store.create_version(
        "bob", "resnet", ent.VersionCreate(lineage={"dataset": "d1"}, metrics={"top1": 0.7})
    )
    assert (first.number, first.model, first.created_by) == (1, "resnet", "bob")
    assert first.lineage == {"dataset": "d1"}
    assert first.metrics == {"top1": 0.7}
    assert (first.aliases, first.variants) == ([], [])
    assert [version(store), version(store)] == [2, 3]
    assert [v.number for v in store.list_versions("resnet")] == [1, 2, 3]
    assert store.get_version("resnet", 1) == first
    assert store.get_model("resnet").latest_version == 3


def test_a_deleted_versions_number_is_not_given_again(store: MetadataStore) -> None:
    model(store)
    assert [version(store), version(store)] == [1, 2]
    store.delete_version(ACTOR, "resnet", 2)
    store.delete_version(ACTOR, "resnet", 1)
    assert version(store) == 3
    assert [v.number for v in store.list_versions("resnet")] == [3]


def test_two_models_number_their_versions_independently(store: MetadataStore) -> None:
    model(store, "resnet")
    model(store, "bert")
    numbers = [version(store, name) for name in ("resnet", "bert", "resnet", "bert", "bert")]
    assert numbers == [1, 1, 2, 2, 3]
    assert store.get_model("resnet").latest_version == 2
    assert store.get_model("bert").latest_version == 3


def test_concurrent_versions_get_distinct_consecutive_numbers(store: MetadataStore) -> None:
    model(store)
    model(store, "bert")
    version(store)
    last = 1
    for _ in range(ROUNDS):
        results = race(THREADS, lambda _: version(store, actor="racer"))
        assert [r for r in results if isinstance(r, Exception)] == []
        numbers = sorted(r for r in results if isinstance(r, int))
        assert numbers == list(range(last + 1, last + 1 + THREADS))
        last += THREADS
    everything = list(range(1, last + 1))
    assert [v.number for v in store.list_versions("resnet")] == everything
    created = [e for e in store.events(model="resnet") if e.kind == "version.created"]
    assert sorted(e.version or 0 for e in created) == everything
    assert store.list_versions("bert") == []


# variants


def test_add_and_get_a_variant(store: MetadataStore) -> None:
    model(store)
    version(store)
    added = store.add_variant("carol", "resnet", 1, CPU, digest("a"), 4321, "tar", "model.tar")
    assert (added.runtime, added.precision, added.profile) == CPU
    assert (added.digest, added.size, added.format, added.filename) == (
        digest("a"),
        4321,
        "tar",
        "model.tar",
    )
    assert (added.benchmarks, added.report, added.verified) == ({}, None, False)
    assert added.created_by == "carol"
    assert store.get_variant("resnet", 1, CPU) == added
    assert store.get_version("resnet", 1).variants == [added]
    assert store.digest_used(digest("a"))
    assert not store.digest_used(digest("b"))


def test_a_variant_key_is_taken_once(store: MetadataStore) -> None:
    model(store)
    version(store)
    version(store)
    store.check_variant_free("resnet", 1, CPU)
    variant(store, "resnet", 1, CPU)
    with pytest.raises(Conflict, match="immutable"):
        store.check_variant_free("resnet", 1, CPU)
    cursor = store.cursor()
    with pytest.raises(Conflict, match="immutable"):
        variant(store, "resnet", 1, CPU, artifact="another")
    assert store.cursor() == cursor
    assert store.get_variant("resnet", 1, CPU).digest == digest("resnet/1/" + "/".join(CPU))
    # The same key in another version, and another key in the same version, are free.
    store.check_variant_free("resnet", 2, CPU)
    store.check_variant_free("resnet", 1, ("onnxruntime", "fp16", "cpu-x86_64"))
    variant(store, "resnet", 2, CPU)
    variant(store, "resnet", 1, ("onnxruntime", "fp16", "cpu-x86_64"))
    assert len(store.get_version("resnet", 1).variants) == 2


def test_a_report_belongs_to_its_digest(store: MetadataStore) -> None:
    model(store)
    version(store)
    added = variant(store, "resnet", 1, CPU)
    cursor = store.cursor()
    wrong = ent.Report(passed=True, digest=digest("something else"))
    with pytest.raises(InvalidArgument, match="report"):
        store.set_report(ACTOR, "resnet", 1, CPU, wrong)
    assert store.cursor() == cursor
    assert store.get_variant("resnet", 1, CPU).report is None

    failing = store.set_report(
        ACTOR, "resnet", 1, CPU, ent.Report(passed=False, digest=added.digest)
    )
    assert failing.report is not None
    assert failing.report["passed"] is False
    assert not failing.verified
    passing = ent.Report(passed=True, digest=added.digest, checks=[{"name": "accuracy"}])
    reported = store.set_report(ACTOR, "resnet", 1, CPU, passing)
    assert reported.verified
    assert reported.report == passing.model_dump()
    assert store.get_variant("resnet", 1, CPU) == reported


def test_benchmarks_merge_by_profile(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, CPU)
    store.set_benchmarks(ACTOR, "resnet", 1, CPU, {"cpu-x86_64": {"latency_p50_ms": 5}})
    store.set_benchmarks(ACTOR, "resnet", 1, CPU, {"cpu-x86_64-avx2": {"latency_p50_ms": 3}})
    merged = store.set_benchmarks(
        ACTOR, "resnet", 1, CPU, {"cpu-x86_64": {"latency_p50_ms": 4, "qps": 100}}
    )
    expected = {
        "cpu-x86_64": {"latency_p50_ms": 4, "qps": 100},
        "cpu-x86_64-avx2": {"latency_p50_ms": 3},
    }
    assert merged.benchmarks == expected
    assert store.get_variant("resnet", 1, CPU).benchmarks == expected


# aliases


def test_production_needs_a_passing_report_or_force(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, CPU)
    cursor = store.cursor()
    with pytest.raises(FailedPrecondition, match="production"):
        alias(store, "resnet", "production", 1, actor="dave")
    [rejected] = store.events(after=cursor)
    assert (rejected.kind, rejected.actor, rejected.version) == ("alias.rejected", "dave", 1)
    assert rejected.detail["alias"] == "production"
    assert rejected.detail["forced"] is False
    assert "verification" in rejected.detail["reason"]
    assert store.get_model("resnet").aliases == {}

    verify(store, "resnet", 1, CPU, passed=False)
    with pytest.raises(FailedPrecondition):
        alias(store, "resnet", "production", 1)

    cursor = store.cursor()
    forced = alias(store, "resnet", "production", 1, force=True, actor="erin")
    assert forced.aliases == {"production": 1}
    [moved] = store.events(after=cursor)
    assert (moved.kind, moved.actor) == ("alias.moved", "erin")
    assert moved.detail == {"alias": "production", "from": None, "to": 1, "forced": True}

    version(store)
    variant(store, "resnet", 2, CPU)
    verify(store, "resnet", 2, CPU)
    assert alias(store, "resnet", "production", 2).aliases == {"production": 2}
    assert store.get_version("resnet", 2).aliases == ["production"]
    assert store.get_version("resnet", 1).aliases == []
    # Other aliases need no report.
    assert alias(store, "resnet", "staging", 1).aliases == {"production": 2, "staging": 1}


def test_expected_version_zero_creates_only(store: MetadataStore) -> None:
    model(store)
    version(store)
    version(store)
    assert alias(store, "resnet", "staging", 1, expected=0).aliases == {"staging": 1}
    cursor = store.cursor()
    with pytest.raises(Conflict, match="staging"):
        alias(store, "resnet", "staging", 2, expected=0)
    assert kinds(store.events(after=cursor)) == {"alias.rejected": 1}
    assert store.get_model("resnet").aliases == {"staging": 1}
    with pytest.raises(Conflict):
        alias(store, "resnet", "canary", 2, expected=1)  # expects one that is not set
    assert alias(store, "resnet", "staging", 2, expected=1).aliases == {"staging": 2}
    with pytest.raises(Conflict):
        alias(store, "resnet", "staging", 1, expected=1)  # stale
    assert store.get_model("resnet").aliases == {"staging": 2}


def test_racing_moves_with_one_expectation_let_one_win(store: MetadataStore) -> None:
    model(store)
    for _ in range(1 + THREADS):
        version(store)
    alias(store, "resnet", "staging", 1)
    cursor = store.cursor()
    targets = [2 + index for index in range(THREADS)]

    results = race(
        THREADS,
        lambda index: alias(
            store, "resnet", "staging", targets[index], expected=1, actor=f"racer-{index}"
        ),
    )
    won = [targets[i] for i, r in enumerate(results) if isinstance(r, ent.ModelOut)]
    lost = [r for r in results if not isinstance(r, ent.ModelOut)]
    assert len(won) == 1
    assert len(lost) == THREADS - 1
    assert all(isinstance(error, Conflict) for error in lost), lost
    assert store.get_model("resnet").aliases == {"staging": won[0]}

    events = store.events(after=cursor)
    assert kinds(events) == {"alias.moved": 1, "alias.rejected": THREADS - 1}
    [moved] = [e for e in events if e.kind == "alias.moved"]
    assert moved.detail["from"] == 1
    assert moved.detail["to"] == won[0]
    assert moved.actor == f"racer-{targets.index(won[0])}"
    rejected = {e.actor for e in events if e.kind == "alias.rejected"}
    assert rejected == {f"racer-{i}" for i in range(THREADS)} - {moved.actor}


@pytest.mark.parametrize("round_", range(5))
def test_racing_creations_of_one_alias_stay_consistent(store: MetadataStore, round_: int) -> None:
    model(store)
    version(store)
    version(store)
    cursor = store.cursor()
    results = race(2, lambda index: alias(store, "resnet", "canary", 1 + index))
    succeeded = [r for r in results if isinstance(r, ent.ModelOut)]
    failed = [r for r in results if not isinstance(r, ent.ModelOut)]
    assert succeeded, failed
    assert all(isinstance(error, Conflict) for error in failed), failed

    events = store.events(after=cursor)
    assert kinds(events) == Counter({"alias.moved": len(succeeded), "alias.rejected": len(failed)})
    last_move = max((e for e in events if e.kind == "alias.moved"), key=lambda e: e.id)
    final = store.get_model("resnet").aliases
    assert final == {"canary": last_move.detail["to"]}
    assert store.get_version("resnet", final["canary"]).aliases == ["canary"]


def test_delete_alias(store: MetadataStore) -> None:
    model(store)
    version(store)
    alias(store, "resnet", "staging", 1)
    store.delete_alias(ACTOR, "resnet", "staging")
    assert store.get_model("resnet").aliases == {}
    with pytest.raises(NotFound):
        store.delete_alias(ACTOR, "resnet", "staging")


def test_alias_names_are_checked(store: MetadataStore) -> None:
    model(store)
    version(store)
    with pytest.raises(InvalidArgument):
        alias(store, "resnet", "Not_A_Label", 1)


# deleting versions


def test_a_version_an_alias_points_at_is_not_deleted(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, CPU)
    alias(store, "resnet", "staging", 1)
    cursor = store.cursor()
    with pytest.raises(Conflict, match="staging"):
        store.delete_version(ACTOR, "resnet", 1)
    assert store.cursor() == cursor
    assert store.get_version("resnet", 1).variants != []

    store.delete_alias(ACTOR, "resnet", "staging")
    assert store.delete_version(ACTOR, "resnet", 1) == [digest("resnet/1/" + "/".join(CPU))]
    with pytest.raises(NotFound):
        store.get_version("resnet", 1)
    assert store.list_versions("resnet") == []
    assert not store.digest_used(digest("resnet/1/" + "/".join(CPU)))


def test_deleting_returns_only_the_digests_nothing_else_uses(store: MetadataStore) -> None:
    model(store)
    model(store, "bert")
    version(store)
    version(store)
    version(store, "bert")
    variant(store, "resnet", 1, CPU, artifact="shared")
    variant(store, "resnet", 1, AVX2, artifact="own")
    variant(store, "resnet", 2, CPU, artifact="shared")
    variant(store, "bert", 1, CPU, artifact="with-bert")
    variant(store, "resnet", 2, AVX2, artifact="with-bert")

    assert store.delete_version(ACTOR, "resnet", 1) == [digest("own")]
    assert store.digest_used(digest("shared"))
    assert store.delete_version(ACTOR, "resnet", 2) == [digest("shared")]
    assert store.digest_used(digest("with-bert"))  # still bert's
    version(store, "bert")
    assert store.delete_version(ACTOR, "bert", 1) == [digest("with-bert")]
    assert store.delete_version(ACTOR, "bert", 2) == []  # one without variants


# resolution


def test_resolve_prefers_a_verified_variant(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, AVX2)  # the best profile, fast, not verified
    latency(store, "resnet", 1, AVX2, 1)
    variant(store, "resnet", 1, CPU)  # slower, on a worse profile, verified
    latency(store, "resnet", 1, CPU, 50)
    verify(store, "resnet", 1, CPU)
    resolved = store.resolve("resnet", "1", NODE, RUNTIMES)
    assert key_of(resolved) == CPU
    assert resolved.variant.verified
    assert (resolved.model.name, resolved.version.number) == ("resnet", 1)

    verify(store, "resnet", 1, AVX2, passed=False)  # a failing report verifies nothing
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == CPU
    verify(store, "resnet", 1, AVX2)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == AVX2


def test_resolve_prefers_the_faster_of_equally_verified_ones(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, AVX2)
    latency(store, "resnet", 1, AVX2, 10)
    variant(store, "resnet", 1, CPU)
    latency(store, "resnet", 1, CPU, 2)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == CPU
    verify(store, "resnet", 1, AVX2)
    verify(store, "resnet", 1, CPU)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == CPU
    # A measured variant before an unmeasured one.
    fp16 = ("onnxruntime", "fp16", "cpu-x86_64-avx2")
    variant(store, "resnet", 1, fp16)
    verify(store, "resnet", 1, fp16)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == CPU
    latency(store, "resnet", 1, fp16, 1)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == fp16


def test_resolve_prefers_the_better_profile_otherwise(store: MetadataStore) -> None:
    model(store)
    version(store)
    variant(store, "resnet", 1, CPU)
    variant(store, "resnet", 1, AVX2)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == AVX2
    # A node without avx2 runs only the baseline one.
    assert key_of(store.resolve("resnet", "1", ["cpu-x86_64"], RUNTIMES)) == CPU
    # Equal latencies leave it to the profile too.
    latency(store, "resnet", 1, CPU, 5)
    latency(store, "resnet", 1, AVX2, 5)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == AVX2
    with pytest.raises(NotFound, match="no variant"):
        store.resolve("resnet", "1", ["cpu-arm64"], RUNTIMES)


def test_resolve_filters_by_runtime(store: MetadataStore) -> None:
    model(store)
    version(store)
    openvino = ("openvino", "fp32", "cpu-x86_64")
    variant(store, "resnet", 1, AVX2)
    variant(store, "resnet", 1, openvino)
    assert key_of(store.resolve("resnet", "1", NODE, RUNTIMES)) == AVX2
    assert key_of(store.resolve("resnet", "1", NODE, ["openvino"])) == openvino
    assert key_of(store.resolve("resnet", "1", NODE, ["onnxruntime"])) == AVX2
    with pytest.raises(NotFound, match="no variant"):
        store.resolve("resnet", "1", NODE, ["tensorrt"])


def test_resolve_refs(store: MetadataStore) -> None:
    model(store)
    with pytest.raises(NotFound):
        store.resolve("resnet", "latest", NODE, RUNTIMES)
    for number in (1, 2, 3):
        version(store)
        variant(store, "resnet", number, CPU)
    alias(store, "resnet", "staging", 2)
    assert store.resolve("resnet", "latest", NODE, RUNTIMES).version.number == 3
    assert store.resolve("resnet", "1", NODE, RUNTIMES).version.number == 1
    staged = store.resolve("resnet", "staging", NODE, RUNTIMES)
    assert staged.version.number == 2
    assert staged.version.aliases == ["staging"]
    assert staged.model.aliases == {"staging": 2}
    assert staged.variant.digest == digest("resnet/2/" + "/".join(CPU))
    with pytest.raises(NotFound, match="alias 'canary'"):
        store.resolve("resnet", "canary", NODE, RUNTIMES)
    with pytest.raises(NotFound):
        store.resolve("resnet", "9", NODE, RUNTIMES)
    with pytest.raises(NotFound):
        store.resolve("nope", "latest", NODE, RUNTIMES)


# events


def test_the_event_log_pages_and_filters(store: MetadataStore) -> None:
    assert store.cursor() == 0
    assert store.events() == []
    for name in ("resnet", "bert"):
        model(store, name)
    for name in ("resnet", "bert", "resnet", "bert", "resnet"):
        version(store, name)
    everything = store.events()
    assert len(everything) == 7
    ids = [event.id for event in everything]
    assert all(later > earlier for earlier, later in itertools.pairwise(ids))
    assert store.cursor() == ids[-1]

    paged: list[ent.EventOut] = []
    after = 0
    while page := store.events(after=after, limit=2):
        assert len(page) <= 2
        paged += page
        after = page[-1].id
    assert paged == everything
    assert store.events(after=store.cursor()) == []
    assert store.events(after=ids[2]) == everything[3:]

    resnet = store.events(model="resnet")
    assert [e.id for e in resnet] == [e.id for e in everything if e.model == "resnet"]
    assert [e.kind for e in resnet] == ["model.created", *["version.created"] * 3]
    assert [e.version for e in resnet] == [None, 1, 2, 3]
    assert store.events(after=resnet[1].id, model="resnet", limit=1) == [resnet[2]]
    assert store.events(model="nope") == []


def test_a_reader_paging_by_cursor_misses_no_event_that_commits_late(
    store: MetadataStore,
) -> None:
    """A watcher pages with after=<the last id it saw>: so an event must not commit after
    one with a higher id, or the watcher, already past that one, never sees it."""
    model(store, "resnet")
    model(store, "bert")
    cursor = store.cursor()
    holding = threading.local()
    about_to_commit, release = threading.Event(), threading.Event()

    def hold(_connection: Any) -> None:  # the slow writer stops just before its COMMIT
        if getattr(holding, "on", False):
            about_to_commit.set()
            release.wait(timeout=30)

    def slow() -> int:
        holding.on = True
        return version(store, "resnet")

    event.listen(store.engine, "commit", hold)
    try:
        with ThreadPoolExecutor(3) as pool:
            slow_one = pool.submit(slow)
            assert about_to_commit.wait(timeout=30)
            # Each done at once, unless it has to wait for the slow one to commit first
            # (on SQLite, whose transactions all take the write lock, both do).
            fast_one = pool.submit(version, store, "bert")
            wait([fast_one], timeout=1)
            reader = pool.submit(store.events, cursor)
            wait([reader], timeout=1)
            release.set()
            seen = reader.result(timeout=30)
            assert (slow_one.result(timeout=30), fast_one.result(timeout=30)) == (1, 1)
    finally:
        release.set()
        event.remove(store.engine, "commit", hold)
    later = store.events(after=seen[-1].id if seen else cursor)
    assert [e.id for e in seen + later] == [e.id for e in store.events(after=cursor)]
    assert len(seen + later) == 2


def test_every_change_writes_one_event_by_its_actor(store: MetadataStore) -> None:
    report = ent.Report(passed=True, digest=digest("a"))
    changes: list[tuple[str, str, int | None, Callable[[str], object]]] = [
        ("model.created", "resnet", None, lambda who: model(store, actor=who)),
        ("version.created", "resnet", 1, lambda who: version(store, actor=who)),
        ("version.created", "resnet", 2, lambda who: version(store, actor=who)),
        (
            "variant.uploaded",
            "resnet",
            1,
            lambda who: variant(store, "resnet", 1, CPU, artifact="a", actor=who),
        ),
        (
            "variant.report",
            "resnet",
            1,
            lambda who: store.set_report(who, "resnet", 1, CPU, report),
        ),
        (
            "variant.benchmarks",
            "resnet",
            1,
            lambda who: store.set_benchmarks(who, "resnet", 1, CPU, {"cpu-x86_64": {}}),
        ),
        (
            "alias.moved",
            "resnet",
            1,
            lambda who: alias(store, "resnet", "production", 1, actor=who),
        ),
        ("alias.moved", "resnet", 2, lambda who: alias(store, "resnet", "staging", 2, actor=who)),
        ("alias.deleted", "resnet", 2, lambda who: store.delete_alias(who, "resnet", "staging")),
        ("version.deleted", "resnet", 2, lambda who: store.delete_version(who, "resnet", 2)),
    ]
    for index, (kind, name, number, change) in enumerate(changes):
        actor = f"actor-{index}"
        cursor = store.cursor()
        change(actor)
        [written] = store.events(after=cursor)
        assert (written.kind, written.actor, written.model, written.version) == (
            kind,
            actor,
            name,
            number,
        )
        assert written.id == store.cursor()

    # Failed changes write nothing, but for a refused alias move, which is logged.
    cursor = store.cursor()
    failures: list[Callable[[], object]] = [
        lambda: model(store),
        lambda: variant(store, "resnet", 1, CPU),
        lambda: store.set_report(ACTOR, "resnet", 1, CPU, ent.Report(passed=True, digest="x")),
        lambda: store.delete_version(ACTOR, "resnet", 1),  # production points at it
        lambda: store.delete_alias(ACTOR, "resnet", "staging"),
        lambda: store.set_benchmarks(ACTOR, "resnet", 9, CPU, {}),
    ]
    for failure in failures:
        with pytest.raises((Conflict, InvalidArgument, NotFound)):
            failure()
    assert store.cursor() == cursor
    with pytest.raises(Conflict):
        alias(store, "resnet", "production", 1, expected=0, actor="late")
    [rejected] = store.events(after=cursor)
    assert (rejected.kind, rejected.actor, rejected.version) == ("alias.rejected", "late", 1)


def test_timestamps_are_utc(store: MetadataStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    model(store)
    version(store)
    variant(store, "resnet", 1, CPU)
    alias(store, "resnet", "staging", 1)
    after = datetime.now(UTC) + timedelta(seconds=5)
    found = store.get_model("resnet")
    numbered = store.get_version("resnet", 1)
    moments = [found.created_at, numbered.created_at, numbered.variants[0].created_at]
    moments += [event.at for event in store.events()]
    for moment in moments:
        assert is_utc(moment), moment
        assert before <= moment <= after


# listeners


def test_listeners_are_told_after_commits_only(store: MetadataStore) -> None:
    seen: list[int] = []
    # What a listener reads on a connection of its own is committed already.
    store.on_commit.append(lambda: seen.append(store.cursor()))

    model(store)
    assert seen == [store.cursor()]
    with pytest.raises(Conflict):
        model(store)
    with pytest.raises(NotFound):
        version(store, "nope")
    assert seen == [store.cursor()]

    number = version(store)
    variant(store, "resnet", number, CPU)
    with pytest.raises(InvalidArgument):
        store.set_report(ACTOR, "resnet", 1, CPU, ent.Report(passed=True, digest="x"))
    with pytest.raises(Conflict):
        variant(store, "resnet", number, CPU)
    assert len(seen) == 3
    assert seen[-1] == store.cursor()

    # A refused alias move fails its own transaction, then commits its rejection.
    with pytest.raises(FailedPrecondition):
        alias(store, "resnet", "production", 1)
    assert len(seen) == 4
    assert seen[-1] == store.cursor()
    assert store.events(after=seen[-2])[0].kind == "alias.rejected"
