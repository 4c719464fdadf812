"""Hand-written SQL for the hot paths, on PostgreSQL and SQLite alike.

Recording email events and planning pushes run a few statements per *group* of
events, with lists of hundreds of ids. Building those statements through peewee's
expression tree costs more CPU than the database spends running them, so these
paths pass each id list as one parameter (a PostgreSQL array; a JSON array that
SQLite's `json_each` unpacks) and insert rows with psycopg2's `execute_values` or
sqlite3's `executemany`. Everything else stays with peewee models.

Functions run on the calling thread's connection, inside the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import peewee as pw

from events import MessageEvent
from models import Message as MessageRow
from models import UserMessage, db, is_postgres

# Rows per INSERT statement (well under either database's parameter limit).
INSERT_PAGE = 500


def param() -> str:
    """The driver's placeholder."""
    return "%s" if is_postgres() else "?"


def any_of(column: str) -> str:
    """`column` is one of a list passed as one parameter (see `ids`)."""
    if is_postgres():
        return f"{column} = ANY(%s)"
    return f"{column} IN (SELECT value FROM json_each(?))"


def ids(values: Iterable[int]) -> Any:
    """The parameter for `any_of`, for integer columns."""
    values = [int(v) for v in values]
    return values if is_postgres() else json.dumps(values)


def texts(values: Iterable[str]) -> Any:
    """The parameter for `any_of`, for text columns."""
    values = [str(v) for v in values]
    return values if is_postgres() else json.dumps(values)


def rows(sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple[Any, ...]]:
    cursor = db.execute_sql(sql, params)
    return list(cursor.fetchall())


def execute(sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement; returns the rows it changed."""
    return int(db.execute_sql(sql, params).rowcount)


def insert(head: str, values: Sequence[Sequence[Any]], tail: str = "") -> None:
    """`head` is `INSERT INTO t (a, b, ...)`; one row per item of `values`; `tail` an
    optional `ON CONFLICT ...` clause."""
    if not values:
        return
    # The driver is called directly here: its errors become peewee's, as everywhere
    # else, so that callers (and `in_thread_connection`) know a lost connection.
    with pw.__exception_wrapper__:  # type: ignore[attr-defined]  # peewee has no stub for it
        cursor = db.cursor()
        if is_postgres():
            from psycopg2.extras import execute_values

            execute_values(cursor, f"{head} VALUES %s {tail}", values, page_size=INSERT_PAGE)
        else:
            marks = ", ".join("?" for _ in values[0])
            cursor.executemany(f"{head} VALUES ({marks}) {tail}", values)


def for_update() -> str:
    """Row locks where the database has them (SQLite has one writer already)."""
    return " FOR UPDATE" if is_postgres() else ""


def quoted(model: type[pw.Model]) -> str:
    return f'"{model._meta.table_name}"'  # type: ignore[attr-defined]


def store_messages(events: Sequence[MessageEvent], now: float) -> None:
    """Keep each event's message snapshot and a flags row per (user, message); both the
    email and the push side record these. A `deleted` mark that arrived first is
    kept: only the snapshot is updated."""
    snapshots = {e.message.id: e.message.model_dump_json() for e in events}
    insert(
        f"INSERT INTO {quoted(MessageRow)} (id, data, deleted, created_at)",
        [(mid, data, False, now) for mid, data in sorted(snapshots.items())],
        "ON CONFLICT (id) DO UPDATE SET data = excluded.data",
    )
    insert(
        f"INSERT INTO {quoted(UserMessage)} (user_id, message_id, read, active_push)",
        sorted({(e.user_id, e.message.id, False, False) for e in events}),
        "ON CONFLICT (user_id, message_id) DO NOTHING",
    )
