"""A RabbitMQ resource alarm blocks publishing; herald's publishes give up after the
connection's blocked timeout instead of waiting for the alarm to end.

Real RabbitMQ and PostgreSQL. The alarm is the node's memory alarm (a watermark of one
byte), so it touches every vhost on the node: it is kept on for a few seconds only,
put back in a `finally`, and a timer on the node puts it back by itself should this
process die first.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from starlette.testclient import TestClient

from delivery.outcomes import TransientDeliveryError
from intake.middleware import RetryWithBackoff
from intake.rabbitmq import RabbitmqBroker
from tests.conftest import message_event
from tests.harness import InProcessHerald, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

USER = 7
# Seconds a publish waits on a blocked connection here (the URL's own parameter, which
# wins over herald's default), so the test holds the alarm for a few seconds only.
BLOCKED_TIMEOUT = 1.0
# What a refused publish may take beyond that: a new connection, the hand-off to and
# from the API's thread pool.
MARGIN = 2.0
# Seconds after which the node clears the alarm by itself if this process has not.
FAILSAFE_SECONDS = 60
# A watermark as `vm_memory_monitor` reports it: a fraction, or `{absolute,Bytes}`.
_WATERMARK = re.compile(r"(\d+(\.\d+)?([eE][-+]?\d+)?|\{absolute,\d+\})")
# The watermark that sets the alarm off: one byte.
_ALARM = "{absolute,1}"


def _rabbitmq_eval(expression: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", "eval", expression], check=True,
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


@contextlib.contextmanager
def memory_alarm() -> Iterator[None]:
    """RabbitMQ's memory alarm, on for as long as the block runs.

    The watermark is read, set to one byte (the alarm goes off at once), and put back
    to the value read. A timer on the node puts it back after `FAILSAFE_SECONDS` if it
    is still one byte then, so a killed test run cannot leave the node alarmed.
    """
    state = _rabbitmq_eval(
        "{vm_memory_monitor:get_vm_memory_high_watermark(), rabbit_alarm:get_alarms()}.")
    found = re.fullmatch(r"\{(.*),\[(.*)\]\}", state.replace(" ", ""))
    assert found and _WATERMARK.fullmatch(found[1]), f"unexpected answer: {state}"
    original, alarms = found[1], found[2]
    if original == _ALARM or alarms:
        pytest.fail(f"RabbitMQ already has an alarm ({state}); clear it first, e.g. "
                    f"rabbitmqctl set_vm_memory_high_watermark 0.4")
    restore = f"vm_memory_monitor:set_vm_memory_high_watermark({original})"
    failsafe = (f"fun() -> case vm_memory_monitor:get_vm_memory_high_watermark() of "
                f"{_ALARM} -> {restore}; _ -> ok end end")
    try:
        _rabbitmq_eval(
            f"timer:apply_after({FAILSAFE_SECONDS * 1000}, erlang, apply, [{failsafe}, []]),"
            f" vm_memory_monitor:set_vm_memory_high_watermark({_ALARM}).")
        yield
    finally:
        alarms = _rabbitmq_eval(f"{restore}, rabbit_alarm:get_alarms().")
        assert alarms == "[]", f"RabbitMQ still has an alarm: {alarms}"


def _served(h: InProcessHerald) -> TestClient:
    """The API with the health checks `supervisor.py` gives it, by the same names."""
    import models
    from ingest.app import create_app
    from intake.broker import ping as broker_ping

    def database() -> None:
        models.ping()

    def queue() -> None:
        broker_ping(h.broker)

    checks: list[Callable[[], None]] = [database, queue]
    return TestClient(create_app(h.api, checks),
                      headers={"Authorization": "Bearer test-key"})


def _pending_ids(client: TestClient) -> list[int]:
    response = client.get(f"/v1/users/{USER}/pending")
    assert response.status_code == 200, response.text
    return [row["message_id"] for row in response.json()["pending"]]


@pytest.mark.parametrize("backend", ["production"])
def test_a_blocked_publish_answers_503_in_bounded_time_and_recovers(
    env: dict[str, str],
) -> None:
    url = f"{env['BROKER_URL']}?blocked_connection_timeout={BLOCKED_TIMEOUT:g}"
    h = InProcessHerald({**env, "BROKER_URL": url})
    assert isinstance(h.broker, RabbitmqBroker)
    retries = next(m for m in h.broker.middleware if isinstance(m, RetryWithBackoff))
    # A worker's broker of its own, whose queue nobody consumes: the refused retry that
    # RabbitMQ reads once the alarm clears stays there.
    worker_side = RabbitmqBroker(url=url, confirm_delivery=True, middleware=[])
    probe = MessageProxy(dramatiq.Message(queue_name="alarm_probe", actor_name="probe",
                                          args=({"user_id": USER},), kwargs={},
                                          options={}))
    event = message_event(USER, channels=("email",))
    headers = {"Idempotency-Key": "alarm-1"}
    try:
        with _served(h) as client:
            h.put_user(USER)
            # Connections, channels and queues in place before the alarm.
            assert client.post("/v1/events", json=message_event(
                USER, channels=("email",))).status_code == 202
            worker_side.declare_queue(probe.queue_name, ensure=True)
            assert client.get("/healthz").status_code == 200

            with memory_alarm():
                started = time.monotonic()
                refused = client.post("/v1/events", json=event, headers=headers)
                took = time.monotonic() - started
                health = client.get("/healthz")

                # The worker side: a retry RabbitMQ will not take becomes a dead letter
                # in bounded time, as any refused retry does.
                started = time.monotonic()
                h.db(lambda: retries.after_process_message(
                    worker_side, probe, exception=TransientDeliveryError("provider down")))
                retry_took = time.monotonic() - started

            assert refused.status_code == 503, refused.text
            assert refused.json() == {"error": "the queue is unavailable; retry (with the "
                                               "same Idempotency-Key)", "field": None}
            assert BLOCKED_TIMEOUT <= took < BLOCKED_TIMEOUT + MARGIN, took
            assert health.status_code == 503, health.text
            assert health.json()["problems"] == ["queue: PublishBlocked"]

            assert BLOCKED_TIMEOUT <= retry_took < BLOCKED_TIMEOUT + MARGIN, retry_took
            assert not probe.failed, "the dead letter was stored"
            letters = h.db(_dead_letter_reasons)
            assert len(letters) == 1 and letters[0].startswith(
                "retry could not be queued (PublishBlocked: RabbitMQ blocked publishing"), \
                letters

            # The alarm is over: the same request, with the same key, is taken, its
            # event reaches the worker (one row, whether or not RabbitMQ also took the
            # refused publish once the alarm cleared), and the broker counts as up.
            accepted = client.post("/v1/events", json=event, headers=headers)
            assert accepted.status_code == 202, accepted.text
            assert accepted.json() == {"accepted": 1}
            assert client.get("/healthz").status_code == 200
            wait_until(lambda: event["message"]["id"] in _pending_ids(client),
                       what="the event's email row")
            assert _pending_ids(client).count(event["message"]["id"]) == 1
    finally:
        worker_side.close()
        h.stop()


def _dead_letter_reasons() -> list[str]:
    from models import DeadLetter

    return [row.reason for row in DeadLetter.select().order_by(DeadLetter.id)]


def test_connections_wait_on_a_block_for_a_bounded_time_unless_the_url_says() -> None:
    from intake.rabbitmq import BLOCKED_CONNECTION_TIMEOUT

    base = "amqp://guest:guest@127.0.0.1:5672/"
    plain: Any = RabbitmqBroker(url=base, middleware=[]).parameters
    assert plain.blocked_connection_timeout == BLOCKED_CONNECTION_TIMEOUT
    own: Any = RabbitmqBroker(url=f"{base}?blocked_connection_timeout=3",
                              middleware=[]).parameters
    assert own.blocked_connection_timeout == 3
    several = RabbitmqBroker(url=f"{base}?blocked_connection_timeout=2.5;{base}",
                             middleware=[])
    assert [p.blocked_connection_timeout for p in several.parameters] == [
        2.5, BLOCKED_CONNECTION_TIMEOUT]
