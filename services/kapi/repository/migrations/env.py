"""Alembic's environment: migrations run on the connection the repository hands over (see
kapi.repository.store.migrate), or on `sqlalchemy.url` when run by the alembic command."""

from __future__ import annotations

from alembic import context
from kapi.repository.schema import Base
from sqlalchemy import create_engine

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "set sqlalchemy.url, or hand a connection in config.attributes"
    with create_engine(url).connect() as fresh:
        context.configure(connection=fresh, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
