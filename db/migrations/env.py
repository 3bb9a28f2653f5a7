"""Alembic environment: the URL comes from the caller (db.migrate), never from an ini file."""

from __future__ import annotations

from alembic import context

from db import tables  # noqa: F401  (registers the tables on Base.metadata)
from db.base import Base
from db.session import get_engine

config = context.config
url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations() -> None:
    engine = get_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot ALTER most things: batch mode recreates the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
