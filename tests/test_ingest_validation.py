"""Bad input gets a clear 4xx naming what is wrong, and changes nothing: no row, no
queued message. Run on both backends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import message_event
from tests.harness import InProcessHerald, backend_env, rabbit_queue_depth

USER = 7


@pytest.fixture(scope="module", params=["embedded", "production"])
def idle_herald(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessHerald]:
    """A herald whose queues nobody consumes, so anything queued stays visible.

    One per backend for the module: every case compares before/after snapshots.
    """
    tmp = tmp_path_factory.mktemp("idle")
    with backend_env(str(request.param), tmp) as values:
        h = InProcessHerald({**values, "OUTBOX_DIR": str(tmp / "outbox"),
                             "MAX_BODY_BYTES": "65536"}, start_worker=False)
        try:
            h.put_user(USER)
            h.client.post(f"/v1/users/{USER}/devices", json={"kind": "fcm", "token": "tok-1"})
            yield h
        finally:
            h.stop()


def snapshot(h: InProcessHerald) -> dict[str, Any]:
    import models

    def read() -> dict[str, Any]:
        tables = {}
        for model in models.ALL_MODELS:
            rows = [
                {k: v for k, v in row.items() if k not in ("updated_at",)}
                for row in model.select().dicts().iterator()  # type: ignore[attr-defined]
            ]
            tables[model._meta.table_name] = sorted(json.dumps(r, sort_keys=True, default=str)
                                                    for r in rows)
        return tables

    state: dict[str, Any] = h.db(read)
    from intake.queues import all_queues

    for queue in all_queues(h.settings.PUSH_SHARDS):
        if h.settings.BROKER_URL:
            try:
                state[queue] = rabbit_queue_depth(h.settings.BROKER_URL, queue)
            except Exception:
                state[queue] = 0  # never declared: nothing was queued
        else:
            state[queue] = h.broker.queues[queue].qsize()
    return state


def _big_event() -> dict[str, Any]:
    return message_event(USER, content="<p>" + "x" * 70_000 + "</p>")


def _without(key: str) -> dict[str, Any]:
    event = message_event(USER)
    event.pop(key)
    return event


def _message_without(key: str) -> dict[str, Any]:
    event = message_event(USER)
    event["message"].pop(key)
    return event


def _with(**changes: Any) -> dict[str, Any]:
    event = message_event(USER)
    event.update(changes)
    return event


def _message_with(**changes: Any) -> dict[str, Any]:
    event = message_event(USER)
    event["message"].update(changes)
    return event


GOOD = {"email": "ada@example.com", "full_name": "Ada"}

# (name, method, path, body (json-able, or bytes for raw), headers, status, field)
CASES: list[tuple[str, str, str, Any, dict[str, str] | None, int, str | None]] = [
    ("no key", "POST", "/v1/events", message_event(USER), {"Authorization": ""}, 401,
     "Authorization"),
    ("wrong key", "POST", "/v1/events", message_event(USER),
     {"Authorization": "Bearer nope"}, 401, "Authorization"),
    ("basic auth", "POST", "/v1/events", message_event(USER),
     {"Authorization": "Basic dGVzdC1rZXk="}, 401, "Authorization"),
    ("bad json", "POST", "/v1/events", b'{"type": "message",', None, 400, None),
    ("not json object", "POST", "/v1/events", b"[1, 2]", None, 400, None),
    ("empty body", "POST", "/v1/events", b"", None, 400, None),
    ("deeply nested JSON", "POST", "/v1/events", b"[" * 30_000 + b"]" * 30_000, None, 400,
     None),
    ("huge body", "POST", "/v1/events", _big_event(), None, 413, None),
    ("unknown event type", "POST", "/v1/events", _with(type="typing"), None, 422, "type"),
    ("missing type", "POST", "/v1/events", _without("type"), None, 422, "type"),
    ("unknown trigger", "POST", "/v1/events", _with(trigger="shouted"), None, 422, "trigger"),
    ("user_id as string", "POST", "/v1/events", _with(user_id="7"), None, 422, "user_id"),
    ("negative user_id", "POST", "/v1/events", _with(user_id=-1), None, 422, "user_id"),
    ("unknown user", "POST", "/v1/events", _with(user_id=999), None, 422, "user_id"),
    ("missing message", "POST", "/v1/events", _without("message"), None, 422, "message"),
    ("message id missing", "POST", "/v1/events", _message_without("id"), None, 422,
     "message.id"),
    ("date_sent wrong type", "POST", "/v1/events", _message_with(date_sent="yesterday"), None,
     422, "message.date_sent"),
    # An email could never show it as a date (after 9999): refused, not queued.
    ("date_sent past year 9999", "POST", "/v1/events",
     _message_with(date_sent=253_402_300_800), None, 422, "message.date_sent"),
    ("date_sent as a boolean", "POST", "/v1/events", _message_with(date_sent=False), None,
     422, "message.date_sent"),
    ("user_id with a fraction", "POST", "/v1/events", _with(user_id=7.5), None, 422,
     "user_id"),
    ("topic of spaces only", "POST", "/v1/events", _message_with(topic="\u0085\u3000 "), None,
     422, "message.topic"),
    ("stream message without topic", "POST", "/v1/events", _message_with(topic=None), None,
     422, "message.topic"),
    ("bad recipient type", "POST", "/v1/events", _message_with(recipient_type="huddle"), None,
     422, "message.recipient_type"),
    ("unknown channel", "POST", "/v1/events", _with(channels=["sms"]), None, 422, "channels.0"),
    ("extra field", "POST", "/v1/events", _with(colour="red"), None, 422, "colour"),
    ("read without ids", "POST", "/v1/events", {"type": "read", "user_id": USER,
                                               "message_ids": []}, None, 422, "message_ids"),
    ("batch with one bad event", "POST", "/v1/events",
     {"events": [message_event(USER), _with(trigger="nope")]}, None, 422, "events[1].trigger"),
    ("empty batch", "POST", "/v1/events", {"events": []}, None, 400, "events"),
    ("batching period zero", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email_batching_period_seconds": 0}, None, 422,
     "email_batching_period_seconds"),
    ("batching period over a week", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email_batching_period_seconds": 604_801}, None, 422,
     "email_batching_period_seconds"),
    ("batching period as float", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email_batching_period_seconds": 1.5}, None, 422,
     "email_batching_period_seconds"),
    ("email with a control character", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada\x01@example.com"}, None, 422, "email"),
    ("email with a next-line character", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada\u0085@example.com"}, None, 422, "email"),
    ("user without email", "PUT", f"/v1/users/{USER}", {"full_name": "Ada"}, None, 422,
     "email"),
    ("bad user id in path", "PUT", "/v1/users/abc", GOOD, None, 400, "user_id"),
    ("apns device without ios_app_id", "POST", f"/v1/users/{USER}/devices",
     {"kind": "apns", "token": "abc"}, None, 422, "ios_app_id"),
    ("unknown device kind", "POST", f"/v1/users/{USER}/devices",
     {"kind": "sms", "token": "abc"}, None, 422, "kind"),
    ("device for unknown user", "POST", "/v1/users/999/devices",
     {"kind": "fcm", "token": "abc"}, None, 404, "user_id"),
    ("delete unknown device", "DELETE", f"/v1/users/{USER}/devices",
     {"kind": "fcm", "token": "nope"}, None, 404, "token"),
    ("idempotency key too long", "POST", "/v1/events", message_event(USER),
     {"Idempotency-Key": "k" * 300}, 400, "Idempotency-Key"),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "headers", "status", "field"),
    CASES, ids=[c[0] for c in CASES],
)
def test_bad_input_is_refused_and_changes_nothing(
    idle_herald: InProcessHerald, name: str, method: str, path: str, body: Any,
    headers: dict[str, str] | None, status: int, field: str | None,
) -> None:
    before = snapshot(idle_herald)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = idle_herald.client.request(
        method, path, content=content,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    assert response.status_code == status, response.text
    answer = response.json()
    assert isinstance(answer["error"], str) and answer["error"]
    assert answer["field"] == field
    assert snapshot(idle_herald) == before


def test_good_input_does_change_things(idle_herald: InProcessHerald) -> None:
    # The snapshot must notice a change, or the table above proves nothing.
    before = snapshot(idle_herald)
    assert idle_herald.post_events(message_event(USER)).status_code == 202
    assert snapshot(idle_herald) != before


def test_a_json_integer_may_be_written_with_a_point(idle_herald: InProcessHerald) -> None:
    # JSON has one number type: 600.0 is the integer 600, as the OpenAPI document says.
    response = idle_herald.client.put(f"/v1/users/{USER}", json={
        **GOOD, "email_batching_period_seconds": 600.0})
    assert response.status_code == 200, response.text
    assert response.json()["email_batching_period_seconds"] == 600
    event = _with(user_id=float(USER))
    event["message"]["date_sent"] = float(event["message"]["date_sent"])
    assert idle_herald.post_events(event).status_code == 202


def test_a_method_not_allowed_lists_the_allowed_ones(idle_herald: InProcessHerald) -> None:
    response = idle_herald.client.delete("/v1/events")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed", "field": None}
    assert response.headers["allow"] == "POST"


def test_idempotency_key_makes_a_retry_a_no_op(idle_herald: InProcessHerald) -> None:
    event = message_event(USER)
    headers = {"Idempotency-Key": "retry-1"}
    first = idle_herald.client.post("/v1/events", json=event, headers=headers)
    after_first = snapshot(idle_herald)
    second = idle_herald.client.post("/v1/events", json=event, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json() == {"accepted": 1}
    assert snapshot(idle_herald) == after_first
    other = idle_herald.client.post("/v1/events", json=message_event(USER), headers=headers)
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"


def test_openapi_and_health_need_no_key(idle_herald: InProcessHerald) -> None:
    client = idle_herald.client
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}
    spec = client.get("/openapi.json", headers={"Authorization": ""}).json()
    assert "/v1/events" in spec["paths"]
    metrics = client.get("/metrics", headers={"Authorization": ""}).text
    assert "herald_pending_email_users" in metrics
