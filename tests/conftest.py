"""Shared fixtures: backends (embedded SQLite + in-process broker, and PostgreSQL +
RabbitMQ), an in-process herald, and event builders."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.fcm import FakeFcm  # noqa: E402
from tests.harness import InProcessHerald, backend_env  # noqa: E402

_message_ids = itertools.count(1000)


@pytest.fixture(params=["embedded", "production"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    with backend_env(backend, tmp_path) as values:
        yield {**values, "OUTBOX_DIR": str(tmp_path / "outbox")}


@pytest.fixture
def database(env: dict[str, str]) -> Iterator[None]:
    """The backend's database, migrated and connected in this thread, for store calls."""
    import models

    database = models.open_database(env["DATABASE_URL"])
    models.migrate()
    try:
        with database.connection_context():
            yield
    finally:
        database.close()


@pytest.fixture
def herald(env: dict[str, str]) -> Iterator[InProcessHerald]:
    h = InProcessHerald(env)
    try:
        yield h
    finally:
        h.stop()


def message_event(user_id: int, *, message_id: int | None = None, trigger: str = "mentioned",
                  channels: tuple[str, ...] = ("push", "email"), stream: str | None = "design",
                  topic: str = "logo", sender: str = "Ada", sender_id: int = 3,
                  content: str = "<p>Hello <b>there</b></p>", **extra: Any) -> dict[str, Any]:
    """A valid message event (a stream message unless `stream` is None)."""
    mid = message_id if message_id is not None else next(_message_ids)
    message: dict[str, Any] = {
        "id": mid, "sender_id": sender_id, "sender_full_name": sender,
        "sender_email": f"{sender.lower()}@example.com",
        "content_html": content, "date_sent": 1_700_000_000 + mid,
    }
    if stream is None:
        message["recipient_type"] = "private"
    else:
        message.update(recipient_type="stream", stream=stream, stream_id=12, topic=topic)
    return {"type": "message", "user_id": user_id, "trigger": trigger,
            "channels": list(channels), "message": message, **extra}


@pytest.fixture
def idle_herald(env: dict[str, str]) -> Iterator[InProcessHerald]:
    """herald's API and actor tree, with no worker consuming the queues."""
    h = InProcessHerald(env, start_worker=False)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def fcm_server() -> Iterator[FakeFcm]:
    """A fake FCM on loopback, answering at once unless told otherwise."""
    fake = FakeFcm()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
