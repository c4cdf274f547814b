"""The PostgreSQL the repository service's tests run on: a real server that SQLAlchemy
reaches through psycopg, and a fresh database per test that no other test sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.engine import Engine, make_url

from tests.support.postgres import drop_database, fresh_database


def models_table(metadata: MetaData) -> Table:
    return Table(
        "models",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("versions", Integer, nullable=False),
    )


@contextlib.contextmanager
def connected(url: str) -> Iterator[Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_a_table_round_trips_through_sqlalchemy(postgres_database: str) -> None:
    metadata = MetaData()
    models = models_table(metadata)
    with connected(postgres_database) as engine:
        metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(
                models.insert(),
                [{"name": "resnet", "versions": 3}, {"name": "bert", "versions": 1}],
            )
        with engine.connect() as connection:
            rows = connection.execute(select(models.c.name, models.c.versions).order_by("name"))
            assert [tuple(row) for row in rows] == [("bert", 1), ("resnet", 3)]
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"


def test_fresh_databases_do_not_see_each_others_tables(postgres_url: str) -> None:
    first, second = fresh_database(postgres_url), fresh_database(postgres_url)
    try:
        assert make_url(first).database != make_url(second).database
        metadata = MetaData()
        models = models_table(metadata)
        with connected(first) as engine:
            metadata.create_all(engine)
            with engine.begin() as connection:
                connection.execute(models.insert(), {"name": "resnet", "versions": 3})
        with connected(second) as engine:
            assert inspect(engine).get_table_names() == []
            # The same table, made again, starts empty.
            metadata.create_all(engine)
            with engine.connect() as connection:
                assert connection.execute(select(models)).all() == []
    finally:
        drop_database(postgres_url, first)
        drop_database(postgres_url, second)
