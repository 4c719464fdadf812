"""Running herald in tests: in-process (fast) and as a real subprocess (kill tests).

Backends: "embedded" is SQLite + the in-process broker; "production" is PostgreSQL
(a schema of its own) + RabbitMQ (a vhost of its own), so tests never see each other.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
RABBIT_HOST = "127.0.0.1"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_service(name: str, port: int) -> None:
    """Fail under CI, skip elsewhere, when a real service the test needs is missing."""
    import pytest

    if service_up(port):
        return
    message = f"{name} is not running on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: tests that need it must not skip)")
    pytest.skip(f"{message}; start it to run this test")


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema; yields a DATABASE_URL pointing at it."""
    require_service("PostgreSQL", 5432)
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{PG_ADMIN_URL}?schema={name}"
    finally:
        with contextlib.suppress(Exception):
            conn.cursor().execute(f"DROP SCHEMA {name} CASCADE")
        conn.close()


# A PostgreSQL role of the outage tests' own: locking it out is a database restart
# as herald's processes see it, and leaves every other session alone.
OUTAGE_ROLE = "herald_outage"


def _pg_admin(statement: str, params: list[Any] | None = None) -> Any:
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        cursor = conn.cursor()
        cursor.execute(statement, params)
        return cursor.fetchone() if cursor.description else None
    finally:
        conn.close()


def as_outage_role(env: dict[str, str]) -> dict[str, str]:
    """`env` (a production backend's) with herald logging in as `OUTAGE_ROLE`, which
    may then be locked out by `database_outage`."""
    url = env["DATABASE_URL"]
    schema = url.rpartition("?schema=")[2]
    if not _pg_admin("SELECT 1 FROM pg_roles WHERE rolname = %s", [OUTAGE_ROLE]):
        with contextlib.suppress(psycopg2.errors.DuplicateObject):
            _pg_admin(f"CREATE ROLE {OUTAGE_ROLE}")
    _pg_admin(f"ALTER ROLE {OUTAGE_ROLE} LOGIN")  # an earlier run may have died locked out
    _pg_admin(f"GRANT ALL ON SCHEMA {schema} TO {OUTAGE_ROLE}")
    # Tables and sequences made by a process logged in as the admin (the schema's
    # migrations, when it starts first) are the role's to use as well.
    for kind in ("TABLES", "SEQUENCES"):
        _pg_admin(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} "
                  f"GRANT ALL ON {kind} TO {OUTAGE_ROLE}")
    return {**env, "DATABASE_URL": url.replace("postgres@", f"{OUTAGE_ROLE}@", 1)}


def database_outage(seconds: float) -> int:
    """A database restart, as `OUTAGE_ROLE`'s sessions see it: each is dropped, and
    new ones are refused for `seconds` (logins come back in the background). Returns
    how many sessions were dropped."""
    _pg_admin(f"ALTER ROLE {OUTAGE_ROLE} NOLOGIN")
    try:
        dropped = _pg_admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE usename = %s", [OUTAGE_ROLE])[0]
    finally:
        threading.Timer(seconds, end_outage).start()
    return int(dropped)


def end_outage() -> None:
    _pg_admin(f"ALTER ROLE {OUTAGE_ROLE} LOGIN")


# Vhosts made, and once used deleted, per `rabbitmqctl` call: each call boots an Erlang
# VM (about half a second), and three calls per test added minutes to the suite.
VHOSTS_PER_CALL = 16
# Whom RabbitMQ records the tests' vhost changes as.
_ACTING_USER = "herald-tests"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


def _erlang_names(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


class _VhostPool:
    """Fresh vhosts made ahead in batches, and used ones deleted in batches (the rest
    when the test session ends). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fresh: list[str] = []
        self._used: list[str] = []
        atexit.register(self.close)

    def take(self) -> str:
        with self._lock:
            if not self._fresh:
                self._fresh = self._make(VHOSTS_PER_CALL)
            return self._fresh.pop()

    def give_back(self, name: str) -> None:
        with self._lock:
            self._used.append(name)
            if len(self._used) < VHOSTS_PER_CALL:
                return
            done, self._used = self._used, []
        self._delete(done)

    def close(self) -> None:
        with self._lock:
            done, self._used, self._fresh = self._used + self._fresh, [], []
        self._delete(done)

    @staticmethod
    def _make(count: int) -> list[str]:
        names = [f"herald_{uuid.uuid4().hex[:10]}" for _ in range(count)]
        try:
            _rabbitmqctl("eval", (
                "lists:foreach(fun(V) -> "
                f'ok = rabbit_vhost:add(V, <<"{_ACTING_USER}">>), '
                'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, '
                f'<<".*">>, <<".*">>, <<".*">>, <<"{_ACTING_USER}">>) '
                f"end, {_erlang_names(names)})."))
        except subprocess.CalledProcessError:
            # A RabbitMQ whose internals differ: the documented commands, one by one.
            names = names[:1]
            _rabbitmqctl("add_vhost", names[0])
            _rabbitmqctl("set_permissions", "-p", names[0], "guest", ".*", ".*", ".*")
        return names

    @staticmethod
    def _delete(names: list[str]) -> None:
        if not names:
            return
        try:
            _rabbitmqctl("eval", "lists:foreach(fun(V) -> rabbit_vhost:delete(V, "
                                 f'<<"{_ACTING_USER}">>) end, {_erlang_names(names)}).')
        except (subprocess.CalledProcessError, OSError):
            for name in names:
                with contextlib.suppress(subprocess.CalledProcessError, OSError):
                    _rabbitmqctl("delete_vhost", name)


_vhosts = _VhostPool()


@contextlib.contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A fresh RabbitMQ vhost; yields a BROKER_URL for it."""
    require_service("RabbitMQ", 5672)
    name = _vhosts.take()
    try:
        yield f"amqp://guest:guest@{RABBIT_HOST}:5672/{name}"
    finally:
        _vhosts.give_back(name)


def rabbit_queue_depth(broker_url: str, queue: str) -> int:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        result = ch.queue_declare(queue, passive=True)
        return int(result.method.message_count)
    finally:
        conn.close()


@contextlib.contextmanager
def backend_env(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment variables for a backend."""
    if backend == "embedded":
        yield {"DATABASE_URL": f"sqlite:///{tmp_path / 'herald.db'}"}
        return
    with pg_schema() as db_url, rabbit_vhost() as broker_url:
        yield {"DATABASE_URL": db_url, "BROKER_URL": broker_url}


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class InProcessHerald:
    """herald's parts wired as `supervisor.py all` wires them, in the test's process.

    Parameters:
      env: configuration (as environment variables).
      providers: push provider factory (fakes), or None for dry run.
      mailer_factory: email sender factory, or None for SMTP_URL / outbox.
    """

    def __init__(self, env: dict[str, str], providers: Any = None,
                 mailer_factory: Any = None, start_worker: bool = True) -> None:
        import dramatiq

        import models
        from actors.tree import ActorTree
        from ingest.api import HeraldAPI
        from ingest.app import create_app
        from intake.broker import make_broker
        from intake.consumers import Consumers
        from settings import load_settings

        env = {"HERALD_API_KEYS": "test-key", "RETRY_MIN_BACKOFF_MS": "50",
               "RETRY_MAX_BACKOFF_MS": "400", "WORKER_THREADS": "8", **env}
        self.settings = load_settings(env)
        self.gave_up: list[str] = []
        self.database = models.open_database(self.settings.DATABASE_URL)
        models.migrate()
        self.broker = make_broker(self.settings)
        self.consumers = Consumers(self.broker, self.settings.PUSH_SHARDS)
        self.api = HeraldAPI(self.settings, self.broker)
        self.app = create_app(self.api)
        self.tree = ActorTree(self.settings, self.gave_up.append, providers, mailer_factory)
        self.worker: Any = None
        if start_worker:
            self.tree.start()
            self.consumers.attach(self.tree)
            self.worker = dramatiq.Worker(self.broker, worker_threads=8, worker_timeout=100)
            self.worker.start()
        from starlette.testclient import TestClient

        self.client = TestClient(self.app, headers={"Authorization": "Bearer test-key"})

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=10_000)
        self.tree.stop(timeout=20)
        self.broker.close()
        self.database.close()

    def put_user(self, user_id: int, **fields: Any) -> dict[str, Any]:
        body = {"email": f"user{user_id}@example.com", "full_name": f"User {user_id}", **fields}
        response = self.client.put(f"/v1/users/{user_id}", json=body)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def post_events(self, *events: dict[str, Any]) -> httpx2.Response:
        body: Any = events[0] if len(events) == 1 else {"events": list(events)}
        return self.client.post("/v1/events", json=body)

    def db(self, fn: Callable[[], Any]) -> Any:
        import models

        with models.db.connection_context():
            return fn()


class HeraldProcess:
    """`python supervisor.py MODE` as a subprocess with its own port.

    Parameters:
      env: configuration on top of a minimal environment.
      mode: "all", "web" or "worker".
      cwd: working directory (the outbox and the default SQLite file live there).
      nice: start the process under `nice -n` this (0: as this process runs).
    """

    def __init__(self, env: dict[str, str], mode: str = "all", cwd: Path | None = None,
                 nice: int = 0) -> None:
        self.port = free_port()
        self.nice = nice
        self.mode = mode
        self.cwd = cwd or ROOT
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(self.port),
            "HERALD_API_KEYS": "test-key",
            "PYTHONPATH": str(ROOT),
            "RETRY_MIN_BACKOFF_MS": "100",
            "RETRY_MAX_BACKOFF_MS": "1000",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.cwd / f"herald-{mode}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> HeraldProcess:
        handle = self.log.open("ab")
        command = [sys.executable, str(ROOT / "supervisor.py"), self.mode]
        if self.nice:
            command = ["nice", "-n", str(self.nice), *command]
        self.proc = subprocess.Popen(
            command,
            cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
        )
        if wait and self.mode in ("all", "web"):
            wait_until(self._healthy, timeout=30, what=f"herald {self.mode} to answer")
        elif wait:
            wait_until(lambda: b"worker started" in self.log.read_bytes(), timeout=30,
                       what="worker to start")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"herald exited {self.proc.returncode}:\n{self.output()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": "Bearer test-key"},
                            timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait_exit(self, timeout: float = 30) -> int | None:
        """The exit status once the process has ended by itself; None (and the process
        killed, so no failed test leaves one behind) if it is still running after
        `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> HeraldProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def push_actor_urns() -> dict[int, str]:
    """{shard: urn} of the PushActors running in this process (one still starting is
    waited for, and left out if its start fails)."""
    import pykka

    from actors.push import PushActor

    urns = {}
    for ref in pykka.ActorRegistry.get_by_class(PushActor):
        try:
            urns[ref.proxy().shard.get(timeout=5)] = ref.actor_urn
        except pykka.ActorDeadError:
            pass
    return urns
