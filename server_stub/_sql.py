"""``Runner``: one open transaction, the same way on SQLite and PostgreSQL.

The rollups, the queries and the stored policy are written once against this
seam, with ``?`` placeholders; ``PostgresRunner`` rewrites them to ``%s``
(none of that SQL uses a literal ``?`` or ``%``).
"""

from __future__ import annotations

import sqlite3
from typing import Any, List, Protocol, Sequence, Tuple

__all__ = ["PostgresRunner", "Runner", "SQLiteRunner"]


class Runner(Protocol):
    """One open transaction on a store, with ``?`` placeholders whatever the backend."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]: ...


class SQLiteRunner:
    """A ``Runner`` on a ``sqlite3`` connection (the caller holds the transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.connection.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.connection.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()


class PostgresRunner:
    """A ``Runner`` on a psycopg 3 connection (the caller holds the transaction)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        rowcount: int = self.connection.execute(sql.replace("?", "%s"), params).rowcount
        return rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        # Not prepared: a generic plan chosen without the window's bounds can be
        # far worse than planning each query (which takes about a millisecond).
        rows: List[Tuple[Any, ...]] = self.connection.execute(
            sql.replace("?", "%s"), params, prepare=False
        ).fetchall()
        return rows
