"""A remove never overtakes its push, even when another worker process took the push.

Every worker consumes every push shard's queue, so a user's push and their `read` can
be taken by two processes. Real processes on RabbitMQ + PostgreSQL, sending through
firebase-admin to the fake FCM.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import message_event
from tests.fakes.fcm import FakeFcm
from tests.harness import HeraldProcess, backend_env, wait_until

pytestmark = pytest.mark.slow

# How long the fake FCM holds its answer to the device that fills the first worker's
# only send slot: time for the second worker to start and take the read meanwhile.
BLOCKING_SECONDS = 12.0
BLOCKER, SLOWED, FILLER = 101, 102, 103


def _add_user_with_device(client: httpx.Client, user: int, token: str) -> None:
    response = client.put(f"/v1/users/{user}", json={
        "email": f"user{user}@example.com", "full_name": "Ada"})
    assert response.status_code == 200, response.text
    response = client.post(f"/v1/users/{user}/devices", json={"kind": "fcm", "token": token})
    assert response.status_code == 201, response.text


def _post(client: httpx.Client, *events: dict[str, object]) -> None:
    response = client.post("/v1/events", json=list(events) if len(events) > 1 else events[0])
    assert response.status_code == 202, response.text


def _push(user: int, message_id: int) -> dict[str, object]:
    return message_event(user, message_id=message_id, channels=("push",))


def _push_planned(database_url: str, user: int, message_id: int) -> bool:
    import models

    database = models.make_database(database_url)
    with database.bind_ctx([models.UserMessage]), database.connection_context():
        return bool(models.UserMessage.select().where(
            (models.UserMessage.user_id == user)
            & (models.UserMessage.message_id == message_id)
            & (models.UserMessage.active_push == True)  # noqa: E712 - peewee expression
        ).exists())


def _unacked(broker_url: str, queue: str) -> int:
    vhost = urlsplit(broker_url).path.lstrip("/")
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers",
         "name", "messages_unacknowledged"],
        check=True, capture_output=True, text=True).stdout
    counts = dict(line.split() for line in listing.splitlines() if line.strip())
    return int(counts.get(queue, 0))


def _events_for(fake: FakeFcm, token: str) -> list[str]:
    return [r.data.get("event", "?") for r in fake.sent() if r.token == token]


def test_a_read_taken_by_another_worker_waits_for_the_push_still_on_its_way(
    tmp_path: Path, fcm_server: FakeFcm
) -> None:
    """Worker A plans a push (it is marked active) but cannot send it yet: its only
    send slot is held by a slow device. Worker B takes the user's read meanwhile. B
    must not send the remove until A's push has been answered: a device shows the
    notification that arrives last."""
    credentials = fcm_server.new_service_account(tmp_path)
    fcm_server.delays["blocker"] = BLOCKING_SECONDS
    with backend_env("production", tmp_path) as env:
        env = {**env, "FCM_CREDENTIALS": str(credentials), "FCM_ENDPOINT": fcm_server.url,
               # Retries of a waiting remove keep coming until the push is answered.
               "RETRY_MAX_BACKOFF_MS": "2000", "RETRY_MAX_TRIES": "30"}
        processes: list[HeraldProcess] = []
        try:
            web = HeraldProcess(env, "web", cwd=tmp_path).start()
            processes.append(web)
            # Two threads take four queue messages (Dramatiq's prefetch); one send at a time.
            first = HeraldProcess({**env, "WORKER_THREADS": "2", "PUSH_INFLIGHT_CAP": "1"},
                                  "worker", cwd=tmp_path).start()
            processes.append(first)
            with web.client() as client:
                _add_user_with_device(client, BLOCKER, "blocker")
                _add_user_with_device(client, SLOWED, "slowed")
                _add_user_with_device(client, FILLER, "filler")
                _post(client, _push(BLOCKER, 1))
                wait_until(lambda: "blocker" in fcm_server.arrived, what="the slow send")
                _post(client, _push(SLOWED, 2))
                wait_until(lambda: _push_planned(env["DATABASE_URL"], SLOWED, 2),
                           what="the second push to be planned")
                _post(client, _push(FILLER, 3))
                _post(client, _push(FILLER, 4))
                # The first worker holds every message it may: the read goes elsewhere.
                wait_until(lambda: _unacked(env["BROKER_URL"], "push.shard0") == 4,
                           what="the first worker's prefetch to fill")
                second = HeraldProcess(env, "worker", cwd=tmp_path).start()
                processes.append(second)
                started = time.monotonic()
                _post(client, {"type": "read", "user_id": SLOWED, "message_ids": [2]})
                assert time.monotonic() - started < BLOCKING_SECONDS / 2, \
                    "the read must be taken while the push still waits"
                wait_until(lambda: len(_events_for(fcm_server, "slowed")) == 2,
                           timeout=BLOCKING_SECONDS + 30, what="the push and its remove")
                assert _events_for(fcm_server, "slowed") == ["message", "remove"]
                assert second.output().count("still on its way") >= 1, \
                    "the second worker took the read, and waited"
        finally:
            for process in processes:
                if process.proc and process.proc.poll() is None:
                    process.proc.kill()


# The rule, on each backend's database -------------------------------------------------


def _user_with_devices(user: int, *tokens: str) -> list[int]:
    import models

    models.User.create(id=user, email=f"user{user}@example.com", full_name="Ada")
    return [models.PushDevice.create(user_id=user, kind="fcm", token=token).id
            for token in tokens]


def _plan(user: int, message_id: int) -> Any:
    from actors import _push_store as store
    from events import MessageEvent, parse_event

    event = parse_event(_push(user, message_id))
    assert isinstance(event, MessageEvent)
    [plan] = store.plan_pushes([event])
    return plan


def _answer(user: int, message_id: int, plan: Any, *devices: int) -> None:
    """Record that `devices` accepted the push, as the worker sending it would."""
    from actors import _push_store as store
    from delivery.outcomes import DELIVERED

    store.record_results([(user, message_id, "message", device, DELIVERED)
                          for device in plan.devices if device.id in devices])


def test_a_remove_waits_until_every_device_has_answered_the_push(database: None) -> None:
    from actors import _push_store as store

    first, second = _user_with_devices(7, "one", "two")
    plan = _plan(7, 20)
    assert plan is not None and [d.id for d in plan.devices] == [first, second]

    with pytest.raises(store.PushOnItsWay, match="message 20 is still on its way"):
        store.plan_remove(7, [20], mark_read=True)
    # The read is kept all the same: no later plan pushes the message.
    assert _plan(7, 20) is None

    _answer(7, 20, plan, first)
    with pytest.raises(store.PushOnItsWay):
        store.plan_remove(7, [20], mark_read=True)
    _answer(7, 20, plan, second)
    remove = store.plan_remove(7, [20], mark_read=True)
    assert remove is not None and [d.id for d in remove.devices] == [first, second]


def test_a_remove_does_not_wait_for_a_device_added_after_the_push_or_an_old_plan(
    database: None
) -> None:
    import models
    from actors import _push_store as store

    [device] = _user_with_devices(7, "one")
    _answer(7, 30, _plan(7, 30), device)
    later = models.PushDevice.create(user_id=7, kind="fcm", token="new",
                                     created_at=time.time() + 1).id
    remove = store.plan_remove(7, [30], mark_read=True)
    assert remove is not None and [d.id for d in remove.devices] == [device, later]

    assert _plan(7, 31) is not None
    with pytest.raises(store.PushOnItsWay):
        store.plan_remove(7, [31], mark_read=True)
    # A plan older than a consumer waits for its push: that push was given up on.
    models.UserMessage.update(
        push_planned_at=time.time() - store.PUSH_ON_ITS_WAY_SECONDS - 1
    ).where(models.UserMessage.message_id == 31).execute()
    assert store.plan_remove(7, [31], mark_read=True) is not None
