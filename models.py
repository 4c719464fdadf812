"""herald's state: peewee models and database setup.

SQLite (WAL) is the embedded default; PostgreSQL is for production. Every model binds
to `db`, a `DatabaseProxy` that `open_database()` points at the real database. The
schema is created and changed by the migrations in `migrations/`, never by
`create_tables` on a live database: `migrate()` applies them at start and from
`python supervisor.py migrate`.

Times are stored as Unix seconds (floats): the same on both databases, and what the
actors compare with `time.time()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

logger = logging.getLogger("herald.models")

db = pw.DatabaseProxy()

# Where the migration files live; peewee-migrate records what ran in `migratehistory`.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long SQLite waits for the single writer's lock before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Largest number of PostgreSQL connections one process keeps.
PG_MAX_CONNECTIONS = 64
# Key of the PostgreSQL advisory lock that serialises migrations across processes.
MIGRATION_LOCK_KEY = 0x4E52_4C44
# libpq connection parameters a PostgreSQL DATABASE_URL may set in its query string
# (TLS, timeouts, keepalives, naming); each is handed to every connection as it is.
PG_URL_PARAMETERS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl",
    "sslcompression", "ssl_min_protocol_version", "channel_binding", "gssencmode",
    "krbsrvname", "passfile", "requirepeer", "connect_timeout", "application_name",
    "target_session_attrs", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "options",
})
# What herald asks of every PostgreSQL connection unless the URL says otherwise: give up
# connecting after 10 s, and notice a peer that vanished (a failover, a dropped route)
# in about a minute rather than after the kernel's two hours of TCP silence.
PG_CONNECTION_DEFAULTS = {
    "connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30",
    "keepalives_interval": "10", "keepalives_count": "3",
}
# Rows per multi-row statement of `Message.mark_deleted`: four values a row stays within
# SQLite's oldest limit of 999 values per statement.
MARK_DELETED_ROWS_PER_STATEMENT = 240
# Longest email batch claim id (`claimed_by`): a worker's id, its claim group, a user id.
CLAIM_ID_MAX_LENGTH = 255


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class User(BaseModel):
    """A chat user herald may notify, with their notification settings."""

    id = pw.BigIntegerField(primary_key=True)
    email = pw.CharField(max_length=254)
    full_name = pw.CharField(max_length=200)
    email_batching_period_seconds = pw.IntegerField(default=120)
    enable_offline_email_notifications = pw.BooleanField(default=True)
    enable_offline_push_notifications = pw.BooleanField(default=True)
    realm_name = pw.CharField(max_length=200, default="")
    realm_url = pw.CharField(max_length=500, default="")
    is_bot = pw.BooleanField(default=False)
    # Stable id for the push bouncer, which never sees our integer ids alone.
    uuid = pw.CharField(max_length=36, default=lambda: str(uuid.uuid4()))
    created_at = pw.DoubleField(default=time.time)
    updated_at = pw.DoubleField(default=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.id,
            "email": self.email,
            "full_name": self.full_name,
            "email_batching_period_seconds": self.email_batching_period_seconds,
            "enable_offline_email_notifications": self.enable_offline_email_notifications,
            "enable_offline_push_notifications": self.enable_offline_push_notifications,
            "realm_name": self.realm_name,
            "realm_url": self.realm_url,
            "is_bot": self.is_bot,
        }


class Message(BaseModel):
    """A snapshot of a chat message as the events carried it (JSON of `events.Message`)."""

    id = pw.BigIntegerField(primary_key=True)
    data = pw.TextField()
    deleted = pw.BooleanField(default=False)
    created_at = pw.DoubleField(default=time.time)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.data)  # type: ignore[no-any-return]

    @classmethod
    def mark_deleted(cls, message_ids: Iterable[int]) -> None:
        """Mark messages deleted, keeping an empty snapshot of any not seen yet so that a
        late `message` event for it stays deleted. Run it inside a transaction.

        One multi-row upsert per few hundred ids: a `message_deleted` may name 10,000,
        and a statement each held the database's write lock for seconds. Ids go in
        ascending order, so that two transactions marking the same messages (every push
        shard and the email side handle each `message_deleted`) lock rows in one order.
        """
        now = time.time()
        rows = [{"id": m, "data": "{}", "deleted": True, "created_at": now}
                for m in sorted(set(message_ids))]
        for chunk in pw.chunked(rows, MARK_DELETED_ROWS_PER_STATEMENT):
            cls.insert_many(chunk).on_conflict(
                conflict_target=[cls.id], update={cls.deleted: True}
            ).execute()


class UserMessage(BaseModel):
    """Per-user flags of one message: read, and whether a push for it is on the device."""

    id = pw.AutoField()

    user_id = pw.BigIntegerField()
    message_id = pw.BigIntegerField()
    read = pw.BooleanField(default=False)
    active_push = pw.BooleanField(default=False)
    # When the push was last planned (made active, or planned again for a retry); the
    # push may still be on its way until its devices' receipts are written.
    push_planned_at = pw.DoubleField(null=True)

    class Meta:
        indexes = ((("user_id", "message_id"), True),)


class PushDevice(BaseModel):
    """A phone that can receive pushes: APNs or FCM token, unique per user."""

    id = pw.AutoField()

    user_id = pw.BigIntegerField(index=True)
    kind = pw.CharField(max_length=8)
    token = pw.CharField(max_length=4096)
    ios_app_id = pw.CharField(max_length=255, null=True)
    created_at = pw.DoubleField(default=time.time)

    class Meta:
        indexes = ((("user_id", "kind", "token"), True),)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "token": self.token, "ios_app_id": self.ios_app_id}


class PushReceipt(BaseModel):
    """A device accepted this push: a retry of the same event skips it."""

    id = pw.AutoField()

    user_id = pw.BigIntegerField()
    message_id = pw.BigIntegerField()
    device_id = pw.BigIntegerField()
    event = pw.CharField(max_length=16)
    created_at = pw.DoubleField(default=time.time)

    class Meta:
        indexes = ((("user_id", "message_id", "device_id", "event"), True),)


class ScheduledMessageNotificationEmail(BaseModel):
    """One message waiting in a user's email batch until `scheduled_timestamp`.

    All rows of one open window share one deadline. A flush claims rows by setting
    `claimed_by` / `claimed_until` (a lease), sends, then deletes them; a lease that
    runs out (the worker died) makes the rows pending again.
    """

    id = pw.AutoField()

    user_id = pw.BigIntegerField()
    message_id = pw.BigIntegerField()
    trigger = pw.CharField(max_length=64)
    mentioned_user_group_id = pw.BigIntegerField(null=True)
    mentioned_user_group_name = pw.CharField(max_length=200, null=True)
    scheduled_timestamp = pw.DoubleField()
    claimed_by = pw.CharField(max_length=CLAIM_ID_MAX_LENGTH, null=True)
    claimed_until = pw.DoubleField(null=True)
    attempts = pw.IntegerField(default=0)
    created_at = pw.DoubleField(default=time.time)

    class Meta:
        table_name = "scheduled_message_notification_email"
        indexes = (
            (("user_id", "message_id"), True),
            (("scheduled_timestamp",), False),
        )


class DeadLetter(BaseModel):
    """Work herald gave up on, with why, so an operator can look and replay."""

    id = pw.AutoField()

    kind = pw.CharField(max_length=32)
    queue = pw.CharField(max_length=64, null=True)
    reason = pw.TextField()
    payload = pw.TextField()
    attempts = pw.IntegerField(default=0)
    user_id = pw.BigIntegerField(null=True, index=True)
    created_at = pw.DoubleField(default=time.time, index=True)
    replayed_at = pw.DoubleField(null=True)

    def as_dict(self, *, with_payload: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "queue": self.queue,
            "reason": self.reason,
            "attempts": self.attempts,
            "user_id": self.user_id,
            "created_at": self.created_at,
            "replayed_at": self.replayed_at,
        }
        if with_payload:
            out["payload"] = json.loads(self.payload)
        return out


class IdempotencyKey(BaseModel):
    """A POST already answered: the same key within the TTL gets the same answer."""

    key = pw.CharField(max_length=300, primary_key=True)
    request_hash = pw.CharField(max_length=64)
    status = pw.IntegerField()
    body = pw.TextField()
    created_at = pw.DoubleField(default=time.time, index=True)


class InstanceSecret(BaseModel):
    """A secret this deployment generated for itself, kept in its database so that every
    start against the same database uses the same one (see `instance_secret`)."""

    name = pw.CharField(max_length=64, primary_key=True)
    value = pw.TextField()
    created_at = pw.DoubleField(default=time.time)

    class Meta:
        table_name = "instance_secret"


ALL_MODELS: list[type[BaseModel]] = [
    User,
    Message,
    UserMessage,
    PushDevice,
    PushReceipt,
    ScheduledMessageNotificationEmail,
    DeadLetter,
    IdempotencyKey,
    InstanceSecret,
]


class _PostgresPool(PooledPostgresqlDatabase):
    """peewee's PostgreSQL connection pool, checking a pooled connection at check-out
    without a round trip.

    A connection the server closed while it sat in the pool (a restart, a failover,
    an idle-session timeout) must not be handed to a request, which would fail. peewee
    sends `SELECT 1` on every check-out to find out, a round trip per request. Here,
    an idle connection whose socket has something to read has heard from the server,
    which for a session that listens for nothing means goodbye: reading it (`poll`)
    raises, and the connection is discarded.
    """

    def _is_closed(self, conn: Any) -> bool:
        if conn.closed or conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
            return bool(super()._is_closed(conn))  # peewee's own rollback or verdict
        return _server_said_goodbye(conn)


def _server_said_goodbye(conn: Any) -> bool:
    poller = select.poll()  # not select(): no limit on the descriptor's number
    poller.register(conn.fileno(), select.POLLIN)
    # A terminated session reads as its FATAL message, then as the end of the stream,
    # and only reading the end raises: read until nothing is left.
    for _ in range(_GOODBYE_READS):
        if not poller.poll(0):
            return bool(conn.closed)  # nothing (more) from the server
        try:
            conn.poll()
        except Exception:
            return True
    return True  # the server keeps talking to an idle session: not one to reuse


# Reads of an idle connection's waiting input before it is given up as not idle.
_GOODBYE_READS = 3


def postgres_parameters(url: str) -> dict[str, str]:
    """The libpq parameters of a PostgreSQL `DATABASE_URL`'s query string, over
    `PG_CONNECTION_DEFAULTS`; herald's own `schema=NAME` becomes a search path.

    Raises ValueError naming a parameter that is not one of `PG_URL_PARAMETERS` or is
    given twice, so a misspelt `sslmode` stops the process instead of being ignored.
    """
    found: dict[str, str] = dict(PG_CONNECTION_DEFAULTS)
    schema = None
    for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items():
        if len(values) > 1:
            raise ValueError(f"{name} is given {len(values)} times")
        if name == "schema":
            schema = values[0]
        elif name in PG_URL_PARAMETERS:
            found[name] = values[0]
        else:
            raise ValueError(f"unknown connection parameter {name!r} (known: schema, "
                             + ", ".join(sorted(PG_URL_PARAMETERS)) + ")")
    if schema:
        found["options"] = " ".join(filter(None, [found.get("options"),
                                                  f"-c search_path={schema}"]))
    return found


def make_database(url: str) -> pw.Database:
    """Build (without connecting) the peewee database for a `DATABASE_URL`.

    `sqlite:///relative.db` and `sqlite:////absolute.db` open SQLite in WAL mode;
    `postgresql://user:pass@host:port/name` opens a connection pool. A `?schema=NAME`
    query on a PostgreSQL URL sets the search path (used to isolate test runs); libpq's
    own parameters (`sslmode=verify-full`, `connect_timeout=5`, ...) are passed on.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :]) or ":memory:"
        return pw.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
            },
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
    if parts.scheme in ("postgresql", "postgres"):
        kwargs: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 5432,
            "user": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            **postgres_parameters(url),
        }
        return _PostgresPool(
            parts.path.lstrip("/") or "postgres",
            max_connections=PG_MAX_CONNECTIONS,
            stale_timeout=300,
            timeout=30,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
    raise ValueError(f"unsupported DATABASE_URL scheme: {parts.scheme}")


def open_database(url: str) -> pw.Database:
    """Point `db` at the database for `url` and return it."""
    database = make_database(url)
    db.initialize(database)
    return database


def is_postgres() -> bool:
    return isinstance(db.obj, pw.PostgresqlDatabase)


def migrate(database: pw.Database | None = None) -> list[str]:
    """Apply every pending migration; return the names applied.

    Processes that start at once (several workers, or an `all` beside a `migrate`)
    take turns: each applies what is still pending when its turn comes.
    """
    from peewee_migrate import Router

    database = database or db.obj
    assert database is not None, "open_database() first"
    router = Router(database, migrate_dir=str(MIGRATIONS_DIR), logger=logger)
    with database.connection_context(), _migration_lock(database):
        todo = router.diff
        if todo:
            router.run()
        return list(todo)


@contextlib.contextmanager
def _migration_lock(database: pw.Database) -> Iterator[None]:
    """Hold the lock that serialises migrations, on an open connection.

    PostgreSQL: an advisory lock. SQLite: an exclusive `flock` on the database file
    itself. SQLite's own locks are `fcntl` record locks, which Linux keeps apart from
    `flock`, so this one does not get in their way; it stops a second process from
    applying a migration that is not idempotent (an `ADD COLUMN`) a second time.
    """
    if isinstance(database, pw.PostgresqlDatabase):
        database.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            yield
        finally:
            database.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        return
    path = database.database if isinstance(database, pw.SqliteDatabase) else ":memory:"
    if path == ":memory:" or not os.path.exists(path):
        yield  # nobody else can see this database
        return
    import fcntl

    with open(path, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that reads then writes: on SQLite it takes the write lock up
    front (`BEGIN IMMEDIATE`), so no other writer slips in between the read and the
    write (a deferred transaction would fail with "database is locked")."""
    if is_postgres():
        with db.atomic():
            yield
    else:
        with db.atomic("IMMEDIATE"):
            yield


# Errors that say the database could not be reached or was busy (a restart, a failover,
# a dropped connection, a locked SQLite file), not that the request was wrong: trying
# the same call again later is right.
DATABASE_UNAVAILABLE = (pw.OperationalError, pw.InterfaceError)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def in_thread_connection(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run `fn(*args)` on this thread's own connection, opened once and then kept.

    For herald's long-lived, bounded threads (the actor pool, the push engines'
    database threads): opening a connection per call costs more than the queries
    (on SQLite, a connect and four PRAGMAs). A connection that failed is closed so
    the next call opens a fresh one, and so is one the server closed while it sat
    idle (a restart, a failover), before `fn` is given it.
    """
    if isinstance(db.obj, _PostgresPool) and not db.is_closed() \
            and not db.in_transaction() and _server_said_goodbye(db.connection()):
        db.manual_close()
    db.connect(reuse_if_open=True)
    try:
        return fn(*args, **kwargs)
    except (pw.OperationalError, pw.InterfaceError):
        if not db.in_transaction():
            db.close()
        raise


def in_call_connection(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run `fn(*args)` on a connection for this call, from a thread of a large pool
    (Dramatiq's worker threads) that uses the database now and then.

    On PostgreSQL the connection is taken from the pool and handed back afterwards:
    keeping one per thread would take as many from the pool as there are threads. A
    connection this thread holds already is used, unless the server dropped it, and is
    closed if it fails (as `in_thread_connection` does). On SQLite the thread's kept
    connection is used, as opening one (a connect and four PRAGMAs) costs more than
    the call.
    """
    if not isinstance(db.obj, _PostgresPool) or not db.is_closed():
        return in_thread_connection(fn, *args, **kwargs)
    with db.connection_context():
        return fn(*args, **kwargs)


def ping() -> None:
    """Run a trivial query; raises if the database is unreachable.

    Inside a connection context, as requests are: a health probe runs on a thread of
    the web's pool, and a connection opened there outside one would never go back to
    the pool, and one the server dropped (a restart) would stay on that thread, failing
    every later probe. In a context, the connection is checked out (a dropped one is
    replaced) and handed back each time.
    """
    with db.connection_context():
        db.execute_sql("SELECT 1").fetchone()


# Name under which `supervisor.py all` keeps the API key it generates when
# HERALD_API_KEYS is unset.
EMBEDDED_API_KEY_NAME = "api_key"


def instance_secret(name: str, generate: Callable[[], str]) -> tuple[str, bool]:
    """The secret stored under `name`, generating and storing one first if there is none;
    returns it and whether this call stored it.

    Several processes may start at once against a fresh database: each inserts its own
    value only if the name is absent, the database keeps exactly one, and every process
    then reads back and uses that one, so none of them goes on with a key the others
    would refuse.

    Parameters:
      name: which secret, e.g. `EMBEDDED_API_KEY_NAME`.
      generate: makes a new value; called only when none is stored yet.
    """
    with db.connection_context():
        found = InstanceSecret.get_or_none(InstanceSecret.name == name)
        if found is not None:
            return str(found.value), False
        mine = generate()
        (InstanceSecret.insert(name=name, value=mine, created_at=time.time())
         .on_conflict_ignore().execute())
        stored = str(InstanceSecret.get_by_id(name).value)
        return stored, stored == mine
