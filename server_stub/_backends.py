"""Which store a ``--db`` string names: ``open_store``, above both backends."""

from __future__ import annotations

from typing import Union

from ._postgres import PostgresStore
from ._sqlite import SQLiteStore
from ._storage import is_postgres_url

__all__ = ["open_store"]


def open_store(db: str) -> Union[SQLiteStore, PostgresStore]:
    """The store ``db`` names: a ``postgresql://`` (or ``postgres://``) URL is PostgreSQL
    (psycopg 3, imported now), anything else a SQLite file, or ``":memory:"``."""
    if is_postgres_url(db):
        return PostgresStore(db)
    return SQLiteStore(db)
