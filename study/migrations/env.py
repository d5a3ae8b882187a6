"""Alembic environment: the URL comes from the caller's Config (``study.storage.migrate``)."""

from __future__ import annotations

from alembic import context

from study.storage import Base, make_engine

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
