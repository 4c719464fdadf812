"""The embedded default's in-memory queue across a graceful stop: what is still queued
when SIGTERM comes is kept in the database and queued again at the next start.
Real processes, SQLite, firebase-admin sending to the fake FCM."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.conftest import message_event
from tests.fakes.fcm import FakeFcm
from tests.harness import HeraldProcess, wait_until

pytestmark = pytest.mark.slow

USER = 7
# Seconds the fake FCM holds the first push: the stop comes while it is out.
HOLD_SECONDS = 3.0
MESSAGES = [11, 12, 13, 14]


def _kept(database: Path) -> list[tuple[str, str, float | None]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT kind, reason, replayed_at FROM dead_letter ORDER BY id").fetchall()


def _embedded_env(tmp_path: Path, fcm_server: FakeFcm, **extra: str) -> dict[str, str]:
    """The embedded default on `tmp_path/herald.db`, pushing to the fake FCM."""
    return {"DATABASE_URL": f"sqlite:///{tmp_path / 'herald.db'}",
            "OUTBOX_DIR": str(tmp_path / "outbox"),
            "FCM_CREDENTIALS": str(fcm_server.new_service_account(tmp_path)),
            "FCM_ENDPOINT": fcm_server.url, **extra}


def _user_with_a_phone(client: httpx.Client) -> None:
    assert client.put(f"/v1/users/{USER}", json={
        "email": "ada@example.com", "full_name": "Ada"}).status_code == 200
    assert client.post(f"/v1/users/{USER}/devices",
                       json={"kind": "fcm", "token": "phone"}).status_code == 201


def _stop_once_the_first_push_is_out(process: HeraldProcess, fcm_server: FakeFcm) -> None:
    """SIGTERM while the slow provider holds the first push; the stop must succeed."""
    wait_until(lambda: fcm_server.arrived, what="the first push to be out")
    assert process.terminate() == 0


def test_a_graceful_stop_keeps_the_queued_events_for_the_next_start(
    tmp_path: Path, fcm_server: FakeFcm
) -> None:
    database = tmp_path / "herald.db"
    # One event at a time: the others wait in the in-memory queue.
    env = _embedded_env(tmp_path, fcm_server, WORKER_THREADS="1")
    fcm_server.delay = HOLD_SECONDS
    with HeraldProcess(env, "all", cwd=tmp_path) as first:
        with first.client() as client:
            _user_with_a_phone(client)
            for message_id in MESSAGES:  # a queue message each
                response = client.post("/v1/events", json=message_event(
                    USER, message_id=message_id, channels=("push",)))
                assert response.status_code == 202, response.text
        _stop_once_the_first_push_is_out(first, fcm_server)
    # The push that was out finished; the other three were kept, not dropped.
    assert len(fcm_server.sent()) == 1
    kept = _kept(database)
    assert [(kind, replayed) for kind, _, replayed in kept] == [("kept_at_stop", None)] * 3
    assert "queued again at its next start" in kept[0][1]

    fcm_server.delay = 0.0
    with HeraldProcess(env, "all", cwd=tmp_path) as second:
        wait_until(lambda: len(fcm_server.sent()) == len(MESSAGES), what="the kept pushes")
        assert "queued again 3 message(s)" in second.output()
        assert second.terminate() == 0
    pushed = sorted(int(r.data["zulip_message_id"]) for r in fcm_server.sent())
    assert pushed == MESSAGES, "each event delivered once"
    assert all(replayed is not None for _, _, replayed in _kept(database))
    # Nothing was counted as given up on.
    assert "dead letter" not in first.output()


def test_a_kept_letter_for_a_queue_gone_since_stays_and_the_start_goes_on(
    tmp_path: Path,
) -> None:
    """Kept with two push shards, started again with one: the letter for the second
    shard's queue stays in the store, the one for the first is queued again."""
    import models
    from intake import dead_letters
    from intake.consumers import Consumers
    from intake.memory import InMemoryBroker, requeue_kept
    from intake.queues import push_actor, push_queue

    database = models.open_database(f"sqlite:///{tmp_path / 'herald.db'}")
    models.migrate()
    broker = InMemoryBroker()
    Consumers(broker, 1)  # declares push.shard0 and email
    try:
        with database.connection_context():
            for shard in (0, 1):
                dead_letters.record_queue_message(
                    kind=dead_letters.KIND_KEPT_AT_STOP, queue=push_queue(shard),
                    actor=push_actor(shard), args=[{"user_id": USER}], kwargs={},
                    reason="kept", attempts=0)
        assert requeue_kept(broker) == 1
        assert broker.queues["push.shard0"].qsize() == 1
        assert _kept(tmp_path / "herald.db")[1][2] is None, "left as it was"
    finally:
        broker.close()
        database.close()


def test_events_still_in_hand_when_the_drain_runs_out_are_kept_for_the_next_start(
    tmp_path: Path, fcm_server: FakeFcm
) -> None:
    """One request's pushes for one user go out one after another; the provider is slow
    and the drain short, so most are still in hand when it ends. The actors' stop fails
    them for a retry, which is kept and sent at the next start: each push once."""
    database = tmp_path / "herald.db"
    env = _embedded_env(tmp_path, fcm_server, DRAIN_SECONDS="1")
    fcm_server.delay = HOLD_SECONDS
    message_ids = list(range(21, 31))
    with HeraldProcess(env, "all", cwd=tmp_path) as first:
        with first.client() as client:
            _user_with_a_phone(client)
            response = client.post("/v1/events", json={"events": [
                message_event(USER, message_id=m, channels=("push",)) for m in message_ids]})
            assert response.status_code == 202, response.text
        _stop_once_the_first_push_is_out(first, fcm_server)
    # The first push was out: its answer came while the actors stopped, and was kept.
    assert [r.data["zulip_message_id"] for r in fcm_server.sent()] == ["21"]
    assert [kind for kind, _, _ in _kept(database)] == ["kept_at_stop"]

    fcm_server.delay = 0.0
    with HeraldProcess(env, "all", cwd=tmp_path) as second:
        wait_until(lambda: len(fcm_server.sent()) == len(message_ids), timeout=30,
                   what="the kept pushes to go out")
        assert second.terminate() == 0
    assert sorted(int(r.data["zulip_message_id"]) for r in fcm_server.sent()) == message_ids
