"""Bad input gets a clear 4xx naming what is wrong, and changes nothing: no row, no
queued message. Run on both backends."""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from starlette.testclient import TestClient

from tests.conftest import message_event
from tests.harness import (
    PG_ADMIN_URL,
    InProcessHerald,
    as_outage_role,
    backend_env,
    database_outage,
    end_outage,
    rabbit_queue_depth,
    wait_until,
)

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
    # NUL (U+0000), which PostgreSQL cannot store, in any string of any body.
    ("full_name with NUL", "PUT", f"/v1/users/{USER}", {**GOOD, "full_name": "Ada\u0000"},
     None, 422, "full_name"),
    ("realm_name with NUL", "PUT", f"/v1/users/{USER}", {**GOOD, "realm_name": "\u0000"},
     None, 422, "realm_name"),
    ("realm_url with NUL", "PUT", f"/v1/users/{USER}",
     {**GOOD, "realm_url": "https://chat.example.com/\u0000"}, None, 422, "realm_url"),
    ("ios_app_id with NUL", "POST", f"/v1/users/{USER}/devices",
     {"kind": "apns", "token": "abc", "ios_app_id": "org.\u0000zulip"}, None, 422,
     "ios_app_id"),
    ("group name with NUL", "POST", "/v1/events",
     _with(mentioned_user_group_id=5, mentioned_user_group_name="team\u0000"), None, 422,
     "mentioned_user_group_name"),
    ("topic with NUL", "POST", "/v1/events", _message_with(topic="lo\u0000go"), None, 422,
     "message.topic"),
    ("content with NUL", "POST", "/v1/events", _message_with(content_html="<p>\u0000</p>"),
     None, 422, "message.content_html"),
    ("sender name with NUL", "POST", "/v1/events", _message_with(sender_full_name="\u0000"),
     None, 422, "message.sender_full_name"),
    ("sender email with NUL", "POST", "/v1/events",
     _message_with(sender_email="ada\u0000@example.com"), None, 422, "message.sender_email"),
    ("participant name with NUL", "POST", "/v1/events",
     _message_with(recipient_type="private", stream=None, stream_id=None, topic=None,
                   pm_users=[{"id": 3, "full_name": "Ada"}, {"id": USER, "full_name": "B\u0000"}]),
     None, 422, "message.pm_users.1.full_name"),
    ("NUL in the second event of a batch", "POST", "/v1/events",
     {"events": [message_event(USER), _message_with(stream="de\u0000sign")]}, None, 422,
     "events[1].message.stream"),
    # Addresses a digest could not be sent to, or whose To: header they would break.
    ("email with a non-ASCII local part", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "jörg@example.de"}, None, 422, "email"),
    *[(f"email with {char!r} before the @", "PUT", f"/v1/users/{USER}",
       {**GOOD, "email": f"a{char}b@example.com"}, None, 422, "email")
      for char in ('>', ',', '"', '<', ';', ':', '\\', '(', '[', ' ')],
    ("email quoted whole", "PUT", f"/v1/users/{USER}", {**GOOD, "email": '"ada"@example.com'},
     None, 422, "email"),
    ("email with two dots in a row", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada..b@example.com"}, None, 422, "email"),
    ("email with two @", "PUT", f"/v1/users/{USER}", {**GOOD, "email": "a@b@example.com"},
     None, 422, "email"),
    ("email with > in the domain", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada@exa>mple.com"}, None, 422, "email"),
    ("email with an empty domain label", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada@example..com"}, None, 422, "email"),
    ("email with an invalid internationalised domain", "PUT", f"/v1/users/{USER}",
     {**GOOD, "email": "ada@\u2603\u2603.example"}, None, 422, "email"),
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


# Addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "stored"), [
    ("first.last+tag@mail.sub-domain.example.co.uk",
     "first.last+tag@mail.sub-domain.example.co.uk"),
    ("o'brien_2@Example.COM", "o'brien_2@Example.COM"),
    # An internationalised domain is kept in the form mail carries it (IDNA).
    ("bob@bücher.de", "bob@xn--bcher-kva.de"),
    ("Bob@BÜCHER.de", "Bob@xn--bcher-kva.de"),
    ("ada@faß.de", "ada@xn--fa-hia.de"),
])
def test_an_address_is_stored_in_a_form_a_digest_can_be_sent_to(
    idle_herald: InProcessHerald, given: str, stored: str
) -> None:
    response = idle_herald.client.put("/v1/users/8", json={"email": given, "full_name": "B"})
    assert response.status_code == 200, response.text
    assert response.json()["email"] == stored
    assert idle_herald.client.get("/v1/users/8").json()["email"] == stored
    # What the digest does with it: a To: header, which takes ASCII only.
    assert email.utils.formataddr(("B", stored)).encode("ascii")


def test_an_address_refused_says_why(idle_herald: InProcessHerald) -> None:
    def refusal(address: str) -> str:
        response = idle_herald.client.put(f"/v1/users/{USER}",
                                          json={**GOOD, "email": address})
        assert response.status_code == 422 and response.json()["field"] == "email"
        return str(response.json()["error"])

    assert "ASCII" in refusal("jörg@example.de")
    assert "To: header" in refusal("a>b@example.com")
    assert "domain" in refusal("ada@exa_mple.com")


def test_the_documented_email_pattern_is_what_is_checked() -> None:
    # The OpenAPI document states the ASCII form, for every regex engine alike.
    from events import EMAIL_PATTERN, deliverable_address

    samples = ["ada@example.com", "a.b-c+d@x.y", "a@localhost", "a..b@x.com", ".a@x.com",
               "a.@x.com", "a@-x.com", "a@x-.com", "a@x.com.", "a@" + "x" * 64 + ".com",
               "a@" + "x" * 63 + ".com", "a>b@x.com", "a@b@x.com", "a b@x.com",
               "a@x.com\n", "{|}~`^?=/*!#$%&'@x.y"]
    for sample in samples:
        try:
            accepted = deliverable_address(sample) == sample
        except ValueError:
            accepted = False
        assert accepted == bool(re.fullmatch(EMAIL_PATTERN, sample)), sample


# Idempotency keys left in progress -------------------------------------------------------


def _queued(h: InProcessHerald) -> dict[str, int]:
    from intake.queues import all_queues

    state = snapshot(h)
    return {q: state[q] for q in all_queues(h.settings.PUSH_SHARDS)}


def test_an_idempotency_key_left_in_progress_is_taken_over_once_abandoned(
    idle_herald: InProcessHerald,
) -> None:
    """The request that marked the key died (or lost the database) before storing its
    answer: retries get 409 while it could still be running, then take the key over."""
    import models
    from ingest.api import IN_PROGRESS, IN_PROGRESS_ABANDONED_SECONDS, scoped_key

    raw = json.dumps(message_event(USER)).encode()
    key = f"left-{time.time_ns()}"
    row = models.IdempotencyKey
    scoped = scoped_key("test-key", key)
    idle_herald.db(lambda: row.create(key=scoped, request_hash=hashlib.sha256(raw).hexdigest(),
                                      status=IN_PROGRESS, body="", created_at=time.time()))

    def post(body: bytes = raw) -> Any:
        return idle_herald.client.post("/v1/events", content=body, headers={
            "Content-Type": "application/json", "Idempotency-Key": key})

    before = _queued(idle_herald)
    assert post().status_code == 409
    assert _queued(idle_herald) == before

    idle_herald.db(lambda: row.update(
        created_at=time.time() - IN_PROGRESS_ABANDONED_SECONDS - 1).where(
        row.key == scoped).execute())
    # Another body under the key is still refused, not run.
    other = post(json.dumps(message_event(USER)).encode())
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    assert _queued(idle_herald) == before

    taken = post()
    assert taken.status_code == 202 and taken.json() == {"accepted": 1}
    after = _queued(idle_herald)
    assert sum(after.values()) == sum(before.values()) + 2  # its push and its email
    stored = idle_herald.db(lambda: row.get_by_id(scoped))
    assert stored.status == 202

    again = post()
    assert again.status_code == 202 and again.json() == {"accepted": 1}
    assert _queued(idle_herald) == after


@pytest.mark.parametrize("backend", ["production"])
def test_an_expired_key_renewed_by_another_retry_is_not_deleted(env: dict[str, str]) -> None:
    """Two retries find the same expired key: the one that renews it first runs, the
    other must see the renewed key (409), not delete it and run too.

    The interleaving is forced on PostgreSQL: this test's session locks the table
    against writes, so the retry under test reads the expired row and then waits at
    its delete; meanwhile the session does what the other retry does (the expired
    row replaced by one in progress) and lets it go on.
    """
    import models
    from ingest.api import IN_PROGRESS, scoped_key

    h = InProcessHerald(env, start_worker=False)
    try:
        h.put_user(USER)
        raw = json.dumps(message_event(USER)).encode()
        key = "expired-then-renewed"
        scoped = scoped_key("test-key", key)
        digest = hashlib.sha256(raw).hexdigest()
        now = time.time()
        row = models.IdempotencyKey
        h.db(lambda: row.create(key=scoped, request_hash=digest, status=202,
                                body='{"accepted": 1}',
                                created_at=now - h.settings.IDEMPOTENCY_TTL_SECONDS - 1))
        before = _queued(h)
        schema = env["DATABASE_URL"].rpartition("?schema=")[2]
        table = f"{schema}.idempotency_key"

        other = psycopg2.connect(PG_ADMIN_URL)
        answers: list[Any] = []
        try:
            cursor = other.cursor()
            cursor.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
            retry = threading.Thread(target=lambda: answers.append(h.client.post(
                "/v1/events", content=raw, headers={"Content-Type": "application/json",
                                                    "Idempotency-Key": key})))
            retry.start()
            wait_until(lambda: _waiting_on(table), what="the retry to wait at its delete")
            cursor.execute(f"DELETE FROM {table} WHERE key = %s", [scoped])
            cursor.execute(f"INSERT INTO {table} (key, request_hash, status, body, created_at)"
                           " VALUES (%s, %s, %s, '', %s)", [scoped, digest, IN_PROGRESS, now])
            other.commit()
            retry.join(30)
            assert not retry.is_alive()
        finally:
            other.close()

        [answer] = answers
        assert answer.status_code == 409, answer.text
        assert answer.json()["field"] == "Idempotency-Key"
        assert _queued(h) == before
        renewed = h.db(lambda: row.get_by_id(scoped))
        assert (renewed.status, renewed.created_at) == (IN_PROGRESS, now)
    finally:
        h.stop()


def _waiting_on(table: str) -> bool:
    """Whether a session waits for a lock on `table`."""
    conn = psycopg2.connect(PG_ADMIN_URL)
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT count(*) FROM pg_locks WHERE relation = %s::regclass "
                       "AND NOT granted", [table])
        return bool(cursor.fetchone()[0])
    finally:
        conn.close()


# Health -----------------------------------------------------------------------------------


def _served(h: InProcessHerald) -> TestClient:
    """The API with the health checks `supervisor.py` gives it, kept running between
    requests (so its threads, and what they hold, live on as in a server)."""
    import models
    from ingest.app import create_app
    from intake.broker import ping as broker_ping

    checks: list[Callable[[], None]] = [models.ping, lambda: broker_ping(h.broker)]
    return TestClient(create_app(h.api, checks))


@pytest.mark.parametrize("backend", ["production"])
def test_health_holds_no_connection_and_recovers_from_a_database_restart(
    env: dict[str, str],
) -> None:
    h = InProcessHerald(as_outage_role(env), start_worker=False)
    try:
        with _served(h) as client:
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
            assert not h.database._in_use  # type: ignore[attr-defined]
            assert database_outage(0.0) >= 1
            time.sleep(0.5)  # the server's goodbye reaches every socket
            response = client.get("/healthz")
            assert response.status_code == 200, response.text
            assert not h.database._in_use  # type: ignore[attr-defined]
    finally:
        end_outage()
        h.stop()


@pytest.mark.parametrize("backend", ["production"])
def test_health_says_unavailable_while_the_broker_is_down(env: dict[str, str]) -> None:
    h = InProcessHerald(env, start_worker=False)
    vhost = env["BROKER_URL"].rsplit("/", 1)[1]

    def rabbitmqctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)

    try:
        with _served(h) as client:
            assert client.get("/healthz").status_code == 200
            # The broker goes away for this herald: its connections are closed, and
            # new ones refused.
            rabbitmqctl("delete_vhost", vhost)
            time.sleep(0.5)
            for _ in range(2):
                response = client.get("/healthz")
                assert response.status_code == 503, response.text
                assert response.json()["status"] == "unavailable"
            rabbitmqctl("add_vhost", vhost)
            rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            assert client.get("/healthz").status_code == 200
    finally:
        h.stop()
