"""`supervisor.py all` without HERALD_API_KEYS: the key it generates is kept in the
database, so a restart accepts the key the operator configured, and unsubscribe links
signed before the restart still work. Real processes, real databases."""

from __future__ import annotations

import contextlib
import email
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg2
import pytest

import models
from tests.conftest import message_event
from tests.harness import ROOT, HeraldProcess, pg_schema, wait_until

USER = 7
# The line of the start-up hint that carries the key.
KEY_LINE = re.compile(r"^herald: API key: (\S+)$", re.MULTILINE)
# What the embedded default stores the key under (models.EMBEDDED_API_KEY_NAME).
KEY_NAME = "api_key"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@contextlib.contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of `kind`; yields its DATABASE_URL."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'herald.db'}"
        return
    with pg_schema() as url:
        yield url


def _embedded(database_url: str, tmp_path: Path) -> dict[str, str]:
    """The embedded default on `database_url`, without API keys (an empty value is
    unset, and overrides the harness's test key)."""
    return {"DATABASE_URL": database_url, "OUTBOX_DIR": str(tmp_path / "outbox"),
            "HERALD_API_KEYS": ""}


def _printed_key(process: HeraldProcess) -> str:
    """The API key `process` printed at start (it prints before it answers)."""
    found = KEY_LINE.findall(process.output())
    assert len(found) == 1, process.output()
    return str(found[0])


def _client(process: HeraldProcess, key: str) -> httpx.Client:
    """An HTTP client for `process` that sends `key` as its bearer key."""
    return httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=30)


def _outbox(directory: Path) -> list[email.message.Message]:
    """The emails herald has written to `directory`, oldest first."""
    if not directory.exists():
        return []
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(directory.glob("*.eml"))]


def _sql(database_url: str, statement: str, params: tuple[str, ...] = ()) -> list[Any]:
    """Run one statement on a connection of the test's own (not herald's), commit, and
    return the rows it read.

    Parameters:
      database_url: a herald DATABASE_URL (SQLite file, or PostgreSQL with `?schema=`).
      statement: SQL with `%s` placeholders.
      params: the placeholders' values.
    """
    if database_url.startswith("sqlite:///"):
        path = database_url[len("sqlite:///"):]
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            return conn.execute(statement.replace("%s", "?"), params).fetchall()
    url, _, schema = database_url.partition("?schema=")
    with contextlib.closing(psycopg2.connect(url)) as conn, conn, conn.cursor() as cursor:
        cursor.execute(f"SET search_path TO {schema}")
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _stored_keys(database_url: str) -> list[str]:
    """Every value in the table the key is kept in."""
    return [row[0] for row in _sql(database_url, "SELECT value FROM instance_secret")]


def _migrate(database_url: str, tmp_path: Path) -> None:
    """Make the schema with `supervisor.py migrate`, as an operator would."""
    done = subprocess.run([sys.executable, str(ROOT / "supervisor.py"), "migrate"],
                          env={"PATH": "", "DATABASE_URL": database_url}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_restart_keeps_the_generated_key_and_its_unsubscribe_links(
    kind: str, tmp_path: Path
) -> None:
    with _database(kind, tmp_path) as database_url:
        env = _embedded(database_url, tmp_path)
        outbox = tmp_path / "outbox"
        first = HeraldProcess(env, "all", cwd=tmp_path).start()
        try:
            key = _printed_key(first)
            assert "generated for this database and stored in it" in first.output()
            with _client(first, "not-the-key") as stranger:
                assert stranger.get(f"/v1/users/{USER}").status_code == 401
            with _client(first, key) as client:
                response = client.put(f"/v1/users/{USER}", json={
                    "email": "ada@example.com", "full_name": "Ada"})
                assert response.status_code == 200, response.text
                event = message_event(USER, channels=("email",), flush="now")
                response = client.post("/v1/events", json=event)
                assert response.status_code == 202, response.text
            [mail] = wait_until(lambda: _outbox(outbox), timeout=15, what="the digest")
            # A long header is folded: the link comes after a line break.
            link = str(mail["List-Unsubscribe"]).strip().strip("<>")
            assert urlsplit(link).path.startswith("/v1/unsubscribe/"), link
            first.kill()  # how it stops does not matter: the key is in the database
        finally:
            if first.proc and first.proc.poll() is None:
                first.proc.kill()

        with HeraldProcess(env, "all", cwd=tmp_path) as second:
            assert _printed_key(second) == key
            assert "stored in the database" in second.output()
            with _client(second, key) as client:
                response = client.get(f"/v1/users/{USER}")
                assert response.status_code == 200, response.text
                assert response.json()["enable_offline_email_notifications"] is True
                event = message_event(USER, channels=("email",))
                response = client.post("/v1/events", json=event)
                assert response.status_code == 202, response.text
                # The link in the email sent before the restart, as a mail client
                # follows it (RFC 8058 one-click, no API key): a wrong signature is 404.
                response = httpx.post(
                    second.url + urlsplit(link).path, content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
                assert response.status_code == 200, response.text
                user = client.get(f"/v1/users/{USER}").json()
                assert user["enable_offline_email_notifications"] is False
        assert _stored_keys(database_url) == [key]


@pytest.mark.parametrize("kind", BACKENDS)
def test_processes_starting_at_once_agree_on_one_key(
    kind: str, tmp_path: Path
) -> None:
    with _database(kind, tmp_path) as database_url:
        if kind == "sqlite":
            # Only PostgreSQL serialises migrations across processes (an advisory lock);
            # on SQLite the schema is made first, and the processes race for the key.
            _migrate(database_url, tmp_path)
        env = _embedded(database_url, tmp_path)
        processes = [HeraldProcess(env, "all", cwd=tmp_path) for _ in range(2)]
        try:
            for process in processes:
                process.start(wait=False)
            for process in processes:
                wait_until(process._healthy, timeout=30, what="herald all to answer")
            keys = {_printed_key(process) for process in processes}
            assert len(keys) == 1, keys
            [key] = keys
            assert _stored_keys(database_url) == [key]
            for process in processes:
                with _client(process, key) as client:
                    assert client.get(f"/v1/users/{USER}").status_code == 404  # not 401
        finally:
            for process in processes:
                if process.proc and process.proc.poll() is None:
                    process.proc.kill()
                    process.proc.wait(10)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_process_that_loses_the_race_uses_the_winners_key(
    kind: str, tmp_path: Path
) -> None:
    with _database(kind, tmp_path) as database_url:
        _migrate(database_url, tmp_path)
        database = models.open_database(database_url)
        try:
            def generate_while_another_process_stores_its_own() -> str:
                # Between this process's read (nothing stored) and its insert.
                _sql(database_url, "INSERT INTO instance_secret (name, value, created_at) "
                     "VALUES (%s, %s, 0)", (KEY_NAME, "theirs"))
                return "mine"

            got = models.instance_secret(KEY_NAME, generate_while_another_process_stores_its_own)
            assert got == ("theirs", False)
            assert models.instance_secret("other", lambda: "fresh") == ("fresh", True)
            assert models.instance_secret("other", lambda: "never") == ("fresh", False)
        finally:
            database.close()
        assert sorted(_stored_keys(database_url)) == ["fresh", "theirs"]


def test_a_deleted_key_is_replaced_and_a_configured_one_wins(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'herald.db'}"
    env = _embedded(database_url, tmp_path)
    with HeraldProcess(env, "all", cwd=tmp_path) as first:
        old = _printed_key(first)
    _sql(database_url, "DELETE FROM instance_secret WHERE name = %s", (KEY_NAME,))
    with HeraldProcess(env, "all", cwd=tmp_path) as second:
        new = _printed_key(second)
        assert new != old
        with _client(second, old) as client:
            assert client.get(f"/v1/users/{USER}").status_code == 401
    # A configured key is used as it is: nothing printed, the stored one refused.
    with HeraldProcess({**env, "HERALD_API_KEYS": "mine"}, "all", cwd=tmp_path) as third:
        assert not KEY_LINE.search(third.output())
        with _client(third, "mine") as client:
            assert client.get(f"/v1/users/{USER}").status_code == 404
        with _client(third, new) as client:
            assert client.get(f"/v1/users/{USER}").status_code == 401
    assert _stored_keys(database_url) == [new]


@pytest.mark.parametrize("mode", ["web", "worker"])
def test_only_all_uses_the_stored_key(mode: str, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'herald.db'}"
    _migrate(database_url, tmp_path)
    _sql(database_url, "INSERT INTO instance_secret (name, value, created_at) "
         "VALUES (%s, %s, 0)", (KEY_NAME, "stored"))
    env = {"PATH": "", "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url,
           "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"}
    done = subprocess.run([sys.executable, str(ROOT / "supervisor.py"), mode], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error" in done.stderr
    assert ("HERALD_SECRET_KEY" if mode == "worker" else "HERALD_API_KEYS") in done.stderr
