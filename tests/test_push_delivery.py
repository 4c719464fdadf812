"""Push delivery end to end: events POSTed to the ingest API, through the broker and the
actor tree, out through the real clients (aioapns, firebase-admin, httpx) to the fake
APNs, FCM and bouncer servers. Providers are configured with environment variables as a
user would configure them. Every test runs on both backends (SQLite + in-process broker,
PostgreSQL + RabbitMQ).
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from events import MessageEvent, parse_event
from tests.conftest import message_event
from tests.fakes.apns import FakeApns, RecordedRequest, make_apns_key
from tests.fakes.bouncer import TOKEN_KIND_APNS, TOKEN_KIND_FCM, FakeBouncer
from tests.fakes.fcm import FakeFcm, FcmRequest
from tests.harness import InProcessHerald, push_actor_urns, wait_until

# The bundle id the APNs client is set up with; pushes must carry the device's own.
CLIENT_TOPIC = "org.herald.client"
IOS_APP_ID = "org.zulip.Zulip"
REALM = {"realm_name": "Example", "realm_url": "https://chat.example.com"}
# How long to keep watching for sends that must not happen.
QUIET_SECONDS = 0.5

_ids = itertools.count(50_000)


def new_id() -> int:
    return next(_ids)


def apns_token() -> str:
    return f"{new_id():064x}"


def fcm_token() -> str:
    return f"fcm-{new_id()}"


class TimedList(list):  # type: ignore[type-arg]
    """A list that notes when each item was appended (the fakes append what they get)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def processed(queue: str = "push.shard0") -> float:
    return sample("herald_events_processed_total", queue=queue)


class Progress:
    """Waits until `n` more events of `queue` have finished their work."""

    def __init__(self, queue: str = "push.shard0") -> None:
        self.queue = queue
        self.start = processed(queue)

    def wait(self, n: int, timeout: float = 20.0) -> None:
        wait_until(lambda: processed(self.queue) - self.start >= n, timeout=timeout,
                   what=f"{n} event(s) processed on {self.queue}")


# Fixtures ------------------------------------------------------------------------------


@pytest.fixture
def fake_apns(tmp_path: Path) -> Iterator[FakeApns]:
    path, key_id, team_id, public_key = make_apns_key(tmp_path)
    server = FakeApns(public_key=public_key, key_id=key_id, team_id=team_id)
    server.key_path = path  # type: ignore[attr-defined]
    server.requests = TimedList()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_fcm(tmp_path: Path) -> Iterator[FakeFcm]:
    server = FakeFcm()
    server.requests = TimedList()
    server.start()
    server.credentials = server.new_service_account(tmp_path)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_bouncer() -> Iterator[FakeBouncer]:
    server = FakeBouncer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def apns_env(fake: FakeApns) -> dict[str, str]:
    return {
        "APNS_KEY_FILE": fake.key_path,  # type: ignore[attr-defined]
        "APNS_KEY_ID": str(fake.key_id),
        "APNS_TEAM_ID": str(fake.team_id),
        "APNS_TOPIC": CLIENT_TOPIC,
        "APNS_ENDPOINT": fake.endpoint,
        "APNS_CA_FILE": fake.ca_file,
    }


def fcm_env(fake: FakeFcm) -> dict[str, str]:
    return {"FCM_CREDENTIALS": fake.credentials, "FCM_ENDPOINT": fake.url}  # type: ignore[attr-defined]


def bouncer_env(fake: FakeBouncer) -> dict[str, str]:
    return {
        "PUSH_BOUNCER_URL": fake.url,
        "PUSH_BOUNCER_SERVER_UUID": fake.server_uuid,
        "PUSH_BOUNCER_API_KEY": fake.api_key,
    }


@pytest.fixture
def start(env: dict[str, str]) -> Iterator[Callable[..., InProcessHerald]]:
    """Start an in-process herald with the backend's env plus the given variables."""
    started: list[InProcessHerald] = []

    def make(**extra: str) -> InProcessHerald:
        h = InProcessHerald({**env, **extra})
        started.append(h)
        return h

    try:
        yield make
    finally:
        for h in started:
            h.stop()


@pytest.fixture
def direct(
    fake_apns: FakeApns, fake_fcm: FakeFcm, start: Callable[..., InProcessHerald]
) -> Callable[..., InProcessHerald]:
    """A herald sending straight to the fake APNs and FCM."""
    return lambda **extra: start(**apns_env(fake_apns), **fcm_env(fake_fcm), **extra)


# Helpers -------------------------------------------------------------------------------


def add_user(h: InProcessHerald, user_id: int, **fields: Any) -> None:
    h.put_user(user_id, **{**REALM, **fields})


def add_device(h: InProcessHerald, user_id: int, kind: str, token: str) -> None:
    body: dict[str, Any] = {"kind": kind, "token": token}
    if kind == "apns":
        body["ios_app_id"] = IOS_APP_ID
    response = h.client.post(f"/v1/users/{user_id}/devices", json=body)
    assert response.status_code == 201, response.text


def user_with_an_apns_device(h: InProcessHerald, user_id: int) -> str:
    """Adds a user with one APNs device; returns its token."""
    add_user(h, user_id)
    apple = apns_token()
    add_device(h, user_id, "apns", apple)
    return apple


def user_with_both_devices(h: InProcessHerald, user_id: int) -> tuple[str, str]:
    """Adds a user with one APNs and one FCM device; returns (APNs token, FCM token)."""
    add_user(h, user_id)
    apple, android = apns_token(), fcm_token()
    add_device(h, user_id, "apns", apple)
    add_device(h, user_id, "fcm", android)
    return apple, android


def devices(h: InProcessHerald, user_id: int) -> set[tuple[str, str]]:
    response = h.client.get(f"/v1/users/{user_id}/devices")
    assert response.status_code == 200, response.text
    return {(d["kind"], d["token"]) for d in response.json()["devices"]}


def post(h: InProcessHerald, *events: dict[str, Any]) -> None:
    response = h.post_events(*events)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": len(events)}


def push_event(user_id: int, message_id: int | None = None, **extra: Any) -> dict[str, Any]:
    mid = message_id if message_id is not None else new_id()
    return message_event(user_id, message_id=mid, channels=("push",), **extra)


def read_event(user_id: int, *message_ids: int) -> dict[str, Any]:
    return {"type": "read", "user_id": user_id, "message_ids": list(message_ids)}


def apns_for(fake: FakeApns, token: str) -> list[RecordedRequest]:
    return fake.requests_for(token)


def fcm_for(fake: FakeFcm, token: str) -> list[FcmRequest]:
    return [r for r in fake.sent() if r.token == token]


def wait_for_requests(fake: FakeApns | FakeFcm, token: str, n: int) -> None:
    """Wait until `fake` has received `n` requests for `token`."""

    def count() -> int:
        if isinstance(fake, FakeApns):
            return len(apns_for(fake, token))
        return len(fcm_for(fake, token))

    wait_until(lambda: count() >= n, what=f"{n} request(s) for {token}")


def apns_event(request: RecordedRequest) -> tuple[str, str]:
    """("message", "<id>") or ("remove", "<ids>") for one APNs request."""
    zulip = request.body["zulip"]
    if zulip["event"] == "remove":
        return "remove", zulip["zulip_message_ids"]
    return "message", str(zulip["zulip_message_id"])


def fcm_event(request: FcmRequest) -> tuple[str, str]:
    if request.data["event"] == "remove":
        return "remove", request.data["zulip_message_ids"]
    return "message", request.data["zulip_message_id"]


def arrivals(fake: Any, tokens: set[str]) -> list[tuple[float, Any]]:
    """(arrival time, request) of what `fake` got for `tokens`, in arrival order."""
    requests = fake.requests
    return [(t, r) for t, r in zip(requests.times, list(requests), strict=True)
            if r.token in tokens]


def dead_letters(h: InProcessHerald) -> list[dict[str, Any]]:
    import models

    return h.db(lambda: [row.as_dict(with_payload=True)
                         for row in models.DeadLetter.select().order_by(models.DeadLetter.id)])


def settle() -> None:
    """Give anything that should not happen the chance to happen."""
    time.sleep(QUIET_SECONDS)


# 1. Payloads ---------------------------------------------------------------------------


def test_stream_mention_reaches_apns_and_fcm_with_zulip_payloads(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    mid = new_id()
    post(h, push_event(7, mid, content="<p>Hello <b>there</b></p>"))

    [request] = wait_until(lambda: apns_for(fake_apns, apple), what="APNs push")
    [sent] = wait_until(lambda: fcm_for(fake_fcm, android), what="FCM push")

    assert request.status == 200
    assert request.topic == IOS_APP_ID  # the device's app id, not APNS_TOPIC
    assert request.push_type == "alert"
    assert request.priority == 10
    assert request.expiration is not None
    assert abs(request.expiration - (time.time() + 86_400)) < 60
    assert request.headers["authorization"].lower().startswith("bearer ")
    body = request.body
    assert body["aps"] == {
        "alert": {"title": "#design > logo", "subtitle": "Ada mentioned you:",
                  "body": "Hello there"},
        "sound": "default",
        "badge": 0,
    }
    expected = {
        "server": "chat.example.com", "realm_name": "Example",
        "realm_url": "https://chat.example.com", "user_id": 7, "sender_id": 3,
        "sender_email": "ada@example.com", "sender_full_name": "Ada",
        "time": 1_700_000_000 + mid, "recipient_type": "stream", "stream": "design",
        "stream_id": 12, "topic": "logo", "zulip_message_id": mid, "content": "Hello there",
        "content_truncated": False, "event": "message",
    }
    assert body["zulip"].items() >= expected.items()

    assert sent.status == 200
    assert sent.priority == "high"
    assert all(isinstance(v, str) for v in sent.data.values())
    assert sent.data.items() >= {k: str(v) for k, v in expected.items()}.items()
    assert sent.data["event"] == "message"


# 2. Read → remove, and per-user order --------------------------------------------------


def test_read_after_push_sends_a_remove(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    first, second = new_id(), new_id()
    post(h, push_event(7, first), push_event(7, second))
    wait_until(lambda: len(apns_for(fake_apns, apple)) == 2, what="two APNs pushes")
    wait_until(lambda: len(fcm_for(fake_fcm, android)) == 2, what="two FCM pushes")

    post(h, read_event(7, first, second))
    removes = wait_until(lambda: apns_for(fake_apns, apple)[2:], what="APNs remove")
    fcm_removes = wait_until(lambda: fcm_for(fake_fcm, android)[2:], what="FCM remove")
    settle()
    assert len(apns_for(fake_apns, apple)) == 3 and len(fcm_for(fake_fcm, android)) == 3

    [remove] = removes
    assert remove.body["aps"] == {"badge": 0}
    assert remove.body["zulip"]["event"] == "remove"
    assert remove.body["zulip"]["zulip_message_ids"] == f"{first},{second}"
    assert remove.body["zulip"]["user_id"] == 7
    assert remove.topic == IOS_APP_ID
    [fcm_remove] = fcm_removes
    assert fcm_remove.priority == "normal"
    assert fcm_remove.data["event"] == "remove"
    assert fcm_remove.data["zulip_message_ids"] == f"{first},{second}"
    assert all(isinstance(v, str) for v in fcm_remove.data.values())

    # Read again: the pushes are already cleared, nothing more is sent.
    progress = Progress()
    post(h, read_event(7, first))
    progress.wait(1)
    settle()
    assert len(apns_for(fake_apns, apple)) == 3 and len(fcm_for(fake_fcm, android)) == 3


def test_read_of_a_message_never_pushed_sends_nothing(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    progress = Progress()
    post(h, read_event(7, new_id(), new_id()))
    progress.wait(1)
    settle()
    assert apns_for(fake_apns, apple) == [] and fcm_for(fake_fcm, android) == []
    # The devices do work: a push for a new message arrives.
    post(h, push_event(7))
    wait_until(lambda: apns_for(fake_apns, apple) and fcm_for(fake_fcm, android),
               what="control push")


def test_push_then_immediate_read_never_reorders(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    ids = [new_id() for _ in range(6)]
    progress = Progress()
    for mid in ids:  # each pair in one request: queued back to back
        post(h, push_event(7, mid), read_event(7, mid))
    progress.wait(2 * len(ids))
    settle()

    for seen in ([apns_event(r) for r in apns_for(fake_apns, apple)],
                 [fcm_event(r) for r in fcm_for(fake_fcm, android)]):
        for mid in ids:
            key = str(mid)
            mine = [kind for kind, which in seen if which == key]
            # Either the push went out and was then removed, or the read came first and
            # neither was sent; never a remove before (or without) its push.
            assert mine in (["message", "remove"], []), (mid, seen)


def test_read_processed_before_its_push_means_no_push(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    mid = new_id()
    progress = Progress()
    post(h, read_event(7, mid))
    progress.wait(1)
    post(h, push_event(7, mid))
    progress.wait(2)
    settle()
    assert apns_for(fake_apns, apple) == [] and fcm_for(fake_fcm, android) == []
    post(h, push_event(7))  # control: an unread message is pushed
    wait_until(lambda: apns_for(fake_apns, apple) and fcm_for(fake_fcm, android),
               what="control push")


def test_a_push_taken_while_the_same_users_push_is_in_flight_waits_for_it(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    """The first push is planned on the consumer's thread at once; the same event
    delivered again while the first is out waits its turn in the user's line, plans
    after the first has recorded its receipt, and so is not sent a second time."""
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    fake_apns.delay = 1.0  # APNs takes a second to answer
    mid = new_id()
    progress = Progress()
    post(h, push_event(7, mid))
    wait_until(lambda: apns_for(fake_apns, apple), what="push to reach APNs")
    post(h, push_event(7, mid))
    progress.wait(2)
    settle()
    assert [apns_event(r) for r in apns_for(fake_apns, apple)] == [("message", str(mid))]
    post(h, push_event(7))  # control: another message is pushed
    wait_until(lambda: len(apns_for(fake_apns, apple)) == 2, what="control push")


# A retry this far off cannot be what sends a remove within `PROMPTLY`.
FAR_BACKOFF_MS = "30000"
PROMPTLY = 5.0


def test_a_read_after_a_push_that_failed_for_now_removes_at_once(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    """A push answered 503 is no longer on its way: the read's remove is not held back
    for it (a remove waits only for pushes still being sent), and the push's retry
    finds the message read and sends nothing."""
    h = direct(RETRY_MIN_BACKOFF_MS=FAR_BACKOFF_MS, RETRY_MAX_BACKOFF_MS=FAR_BACKOFF_MS)
    apple = user_with_an_apns_device(h, 7)
    fake_apns.script(apple, [(503, "ServiceUnavailable", {})])
    mid = new_id()
    post(h, push_event(7, mid))
    wait_for_requests(fake_apns, apple, 1)
    read_at = time.monotonic()
    post(h, read_event(7, mid))
    wait_for_requests(fake_apns, apple, 2)
    assert time.monotonic() - read_at < PROMPTLY
    assert [(apns_event(r), r.status) for r in apns_for(fake_apns, apple)] == [
        (("message", str(mid)), 503), (("remove", str(mid)), 200)]


def test_a_read_after_a_bouncer_push_that_failed_for_now_removes_at_once(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald]
) -> None:
    h = start(**bouncer_env(fake_bouncer), RETRY_MIN_BACKOFF_MS=FAR_BACKOFF_MS,
              RETRY_MAX_BACKOFF_MS=FAR_BACKOFF_MS)
    _bouncer_user(h, fake_bouncer, 7)
    fake_bouncer.fail_next(503)
    mid = new_id()
    post(h, push_event(7, mid))
    wait_until(lambda: fake_bouncer.received("push/notify"), what="the push")
    read_at = time.monotonic()
    post(h, read_event(7, mid))
    wait_until(lambda: len(fake_bouncer.received("push/notify")) == 2, what="the remove")
    assert time.monotonic() - read_at < PROMPTLY
    failed, removed = fake_bouncer.received("push/notify")
    assert (failed.status, removed.status) == (503, 200)
    assert removed.fields["gcm_payload"]["event"] == "remove"


# 3. message_deleted ---------------------------------------------------------------------


def test_message_deleted_removes_from_users_with_an_active_push(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    tokens = {}
    for user in (1, 7, 8, 9):
        add_user(h, user)
        tokens[user] = (apns_token(), fcm_token())
        add_device(h, user, "apns", tokens[user][0])
        add_device(h, user, "fcm", tokens[user][1])
    mid = new_id()
    progress = Progress()
    post(h, push_event(1, mid), push_event(7, mid), push_event(8, mid))
    for user in (1, 7, 8):
        apple, android = tokens[user]
        wait_for_requests(fake_apns, apple, 1)
        wait_for_requests(fake_fcm, android, 1)

    post(h, {"type": "message_deleted", "message_ids": [mid]})
    for user in (1, 7, 8):
        apple, android = tokens[user]
        wait_for_requests(fake_apns, apple, 2)
        wait_for_requests(fake_fcm, android, 2)
        assert apns_event(apns_for(fake_apns, apple)[1]) == ("remove", str(mid))
        assert fcm_event(fcm_for(fake_fcm, android)[1]) == ("remove", str(mid))
    progress.wait(4)
    settle()
    assert apns_for(fake_apns, tokens[9][0]) == [] and fcm_for(fake_fcm, tokens[9][1]) == []
    assert all(len(apns_for(fake_apns, tokens[u][0])) == 2 for u in (1, 7, 8))

    # A push for the deleted message that arrives late is not sent.
    post(h, push_event(9, mid))
    progress.wait(5)
    settle()
    assert apns_for(fake_apns, tokens[9][0]) == []


def test_a_deletion_taken_ahead_of_the_push_of_its_message_keeps_it_from_being_sent(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    mid, other = new_id(), new_id()
    deleted = parse_event({"type": "message_deleted", "message_ids": [mid]})
    pushes = [parse_event(push_event(7, m)) for m in (mid, other)]
    # One queue message of the push shard, as a consumer hands it over: the deletion,
    # then the push of the deleted message and of another one.
    outcomes = h.tree.push(0, [(deleted, None), *((p, None) for p in pushes)])

    assert outcomes == [None, None, None]
    wait_until(lambda: apns_for(fake_apns, apple), what="the other push")
    settle()
    assert [apns_event(r) for r in apns_for(fake_apns, apple)] == [("message", str(other))]


def test_message_deleted_waits_for_the_push_in_flight(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    fake_apns.delay = 1.0  # APNs takes a second to answer the push
    mid = new_id()
    idle = _in_progress()
    post(h, push_event(7, mid))
    wait_until(lambda: apns_for(fake_apns, apple), what="push to reach APNs")
    post(h, {"type": "message_deleted", "message_ids": [mid]})
    # Both messages hold a worker thread: the push waiting for APNs, the delete for it.
    wait_until(lambda: _in_progress() == idle + 2, what="two messages in progress")
    wait_until(lambda: len(apns_for(fake_apns, apple)) == 2, what="remove")
    wait_until(lambda: _in_progress() == idle, what="no message in progress")
    assert [apns_event(r) for r in apns_for(fake_apns, apple)] == [
        ("message", str(mid)), ("remove", str(mid))]
    times = [t for t, _ in arrivals(fake_apns, {apple})]
    # The remove is sent only once the push is answered, never alongside it.
    assert times[1] - times[0] >= 0.9


# 4. Invalid devices ---------------------------------------------------------------------


def test_invalid_devices_are_deleted_and_not_retried(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    add_user(h, 7)
    bad_apns = {
        apns_token(): (410, "Unregistered"),
        apns_token(): (400, "BadDeviceToken"),
        apns_token(): (400, "DeviceTokenNotForTopic"),
    }
    bad_fcm = {fcm_token(): "UNREGISTERED", fcm_token(): "SENDER_ID_MISMATCH"}
    flaky, healthy = apns_token(), fcm_token()
    for token, (status, reason) in bad_apns.items():
        add_device(h, 7, "apns", token)
        fake_apns.script(token, [(status, reason, {})])
    for token, code in bad_fcm.items():
        add_device(h, 7, "fcm", token)
        fake_fcm.script(token, [(0, code, {})])
    add_device(h, 7, "apns", flaky)
    add_device(h, 7, "fcm", healthy)
    fake_apns.script(flaky, [(503, "ServiceUnavailable", {})])  # makes the event retry

    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    settle()
    assert devices(h, 7) == {("apns", flaky), ("fcm", healthy)}
    for token, (status, _) in bad_apns.items():
        assert [r.status for r in apns_for(fake_apns, token)] == [status]
    for token in bad_fcm:
        assert len(fcm_for(fake_fcm, token)) == 1
    assert [r.status for r in apns_for(fake_apns, flaky)] == [503, 200]
    assert [r.status for r in fcm_for(fake_fcm, healthy)] == [200]
    assert dead_letters(h) == []


# 5-7. Transient failures, Retry-After, retry budget, permanent failures ------------------


def test_transient_failures_resend_only_to_the_failing_device(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    add_user(h, 7)
    flaky_apns, flaky_fcm = apns_token(), fcm_token()
    healthy_apns, healthy_fcm = apns_token(), fcm_token()
    for kind, token in (("apns", flaky_apns), ("fcm", flaky_fcm), ("apns", healthy_apns),
                        ("fcm", healthy_fcm)):
        add_device(h, 7, kind, token)
    fake_apns.script(flaky_apns, [(503, "ServiceUnavailable", {})] * 2)
    fake_fcm.script(flaky_fcm, [(503, "UNAVAILABLE", {})] * 2)

    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    settle()
    assert [r.status for r in apns_for(fake_apns, flaky_apns)] == [503, 503, 200]
    assert [r.status for r in fcm_for(fake_fcm, flaky_fcm)] == [503, 503, 200]
    assert [r.status for r in apns_for(fake_apns, healthy_apns)] == [200]
    assert [r.status for r in fcm_for(fake_fcm, healthy_fcm)] == [200]
    assert dead_letters(h) == []


def test_a_failed_push_is_logged_without_its_content_or_tokens(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns,
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    fake_apns.script(apple, [(503, "ServiceUnavailable", {})])

    progress = Progress()
    post(h, push_event(7, content="<p>the launch codes</p>", sender="Mallory"))
    progress.wait(1)
    assert [r.status for r in apns_for(fake_apns, apple)] == [503, 200]
    failed = [r.getMessage() for r in caplog.records if "Failed to process message" in
              r.getMessage()]
    assert failed and all("push_shard0#" in line for line in failed), failed
    assert "launch codes" not in caplog.text
    assert "Mallory" not in caplog.text
    assert apple not in caplog.text


def test_retry_after_is_a_floor(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    apple, android = user_with_both_devices(h, 7)
    fake_apns.script(apple, [(429, "TooManyRequests", {"Retry-After": "2"})])
    fake_fcm.script(android, [(429, "QUOTA_EXCEEDED", {"Retry-After": "2"})])

    progress = Progress()
    ages_before = _ages()
    post(h, push_event(7))
    progress.wait(1, timeout=30)
    for fake in (fake_apns, fake_fcm):
        tries = arrivals(fake, {apple, android})
        assert [r.status for _, r in tries] == [429, 200]
        assert tries[1][0] - tries[0][0] >= 2.0
    # The event's age is observed once, when it is done, and counts the wait.
    count, total = (after - before for after, before in zip(_ages(), ages_before,
                                                            strict=True))
    assert count == 1 and 2.0 <= total < 30


def _steps() -> dict[str, tuple[float, float]]:
    """(count, sum) of the queue wait on push.shard0 and of each push stage."""
    found = {"queued": (sample("herald_queue_wait_seconds_count", queue="push.shard0"),
                        sample("herald_queue_wait_seconds_sum", queue="push.shard0"))}
    for stage in ("handoff", "plan", "send", "record"):
        found[stage] = (sample("herald_push_stage_seconds_count", stage=stage),
                        sample("herald_push_stage_seconds_sum", stage=stage))
    return found


def test_a_push_is_timed_step_by_step_and_a_retry_is_not_queue_wait(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    fake_apns.script(apple, [(503, "ServiceUnavailable", {})])
    fake_apns.delay = 0.3  # every answer takes 0.3 s

    before, ages_before = _steps(), _ages()
    progress = Progress()
    post(h, push_event(7))
    progress.wait(1, timeout=30)
    assert [r.status for r in apns_for(fake_apns, apple)] == [503, 200]
    steps = {step: (count - before[step][0], total - before[step][1])
             for step, (count, total) in _steps().items()}
    # The queue wait is the first try's only: the retry's wait is its backoff.
    assert steps["queued"][0] == 1
    # Each try goes through every stage; the send stage holds the provider's answer.
    assert {step: count for step, (count, _) in steps.items() if step != "queued"} == {
        "handoff": 2, "plan": 2, "send": 2, "record": 2}
    assert 0.6 <= steps["send"][1] < 0.6 + 10
    # The steps add up to no more than the event's age (publish to done, backoff in).
    age = _ages()[1] - ages_before[1]
    assert 0.6 < sum(total for _, total in steps.values()) <= age


def _in_progress(queue: str = "push.shard0") -> float:
    return sample("herald_messages_in_progress", queue=queue)


def _ages(queue: str = "push.shard0") -> tuple[float, float]:
    return (sample("herald_event_age_seconds_count", queue=queue),
            sample("herald_event_age_seconds_sum", queue=queue))


def test_retry_budget_exhausted_goes_to_the_dead_letter_store(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    h = direct(RETRY_MAX_TRIES="3")
    apple = user_with_an_apns_device(h, 7)
    fake_apns.script(apple, [(503, "ServiceUnavailable", {})] * 20)
    mid = new_id()
    post(h, push_event(7, mid))
    [letter] = wait_until(lambda: dead_letters(h), what="dead letter")
    settle()
    assert len(apns_for(fake_apns, apple)) == 3
    assert letter["kind"] == "queue_message"
    assert letter["queue"] == "push.shard0"
    assert letter["attempts"] == 3
    assert letter["user_id"] == 7
    assert "gave up after 3 tries" in letter["reason"]
    assert "ServiceUnavailable" in letter["reason"]
    assert letter["payload"]["args"][0]["message"]["id"] == mid
    assert len(dead_letters(h)) == 1


@pytest.mark.parametrize("backend", ["production"])
def test_a_retry_the_broker_refuses_becomes_a_dead_letter_with_both_reasons(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, env: dict[str, str]
) -> None:
    h = direct()
    apple = user_with_an_apns_device(h, 7)
    fake_apns.script(apple, [(503, "ServiceUnavailable", {})] * 20)
    # RabbitMQ refuses every publish to the shard's delay queue, where retries wait.
    vhost = env["BROKER_URL"].rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "-p", vhost, "--apply-to", "queues",
                    "refuse-retries", r"^push\.shard0\.DQ$",
                    '{"max-length": 0, "overflow": "reject-publish"}'],
                   check=True, capture_output=True)
    mid = new_id()
    post(h, push_event(7, mid))
    [letter] = wait_until(lambda: dead_letters(h), timeout=30, what="dead letter")
    assert letter["queue"] == "push.shard0"
    assert letter["attempts"] == 1
    assert "retry could not be queued" in letter["reason"]
    assert "ServiceUnavailable" in letter["reason"]
    assert letter["payload"]["args"][0]["message"]["id"] == mid
    # Not also retried: the one try is all the provider saw.
    settle()
    assert len(apns_for(fake_apns, apple)) == 1


def test_a_key_that_cannot_be_used_fails_pushes_instead_of_counting_them_sent(
    fake_apns: FakeApns, start: Callable[..., InProcessHerald], tmp_path: Path
) -> None:
    # A worker started without `python supervisor.py`'s start-up check (which refuses
    # such a key) must still not take the push for sent.
    broken = tmp_path / "broken.p8"
    broken.write_text("not a key")
    h = start(**{**apns_env(fake_apns), "APNS_KEY_FILE": str(broken)}, RETRY_MAX_TRIES="2")
    dry_runs = sample("herald_pushes_total", provider="apns", outcome="dry_run")
    user_with_an_apns_device(h, 7)
    mid = new_id()
    post(h, push_event(7, mid))
    [letter] = wait_until(lambda: dead_letters(h), timeout=30, what="dead letter")
    assert "push providers could not be set up" in letter["reason"]
    assert "APNS_KEY_FILE" in letter["reason"]
    assert letter["attempts"] == 2
    assert letter["payload"]["args"][0]["message"]["id"] == mid
    assert sample("herald_pushes_total", provider="apns", outcome="dry_run") == dry_runs
    assert fake_apns.requests == []


def test_permanent_failures_are_dead_lettered_without_retry(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    add_user(h, 7)
    bad_topic, bad_argument, flaky = apns_token(), fcm_token(), fcm_token()
    add_device(h, 7, "apns", bad_topic)
    add_device(h, 7, "fcm", bad_argument)
    add_device(h, 7, "fcm", flaky)
    fake_apns.script(bad_topic, [(400, "BadTopic", {})] * 5)
    fake_fcm.script(bad_argument, [(0, "INVALID_ARGUMENT", {})] * 5)
    fake_fcm.script(flaky, [(503, "UNAVAILABLE", {})])  # the event itself is retried once

    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    settle()
    assert [r.status for r in fcm_for(fake_fcm, flaky)] == [503, 200]
    assert [r.status for r in apns_for(fake_apns, bad_topic)] == [400]
    assert [r.status for r in fcm_for(fake_fcm, bad_argument)] == [400]
    letters = dead_letters(h)
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(reasons) == 2, letters
    assert reasons[0] == "apns: BadTopic"
    assert reasons[1].startswith("fcm: INVALID_ARGUMENT")
    assert {letter["user_id"] for letter in letters} == {7}
    # Permanent is not invalid: the devices stay registered.
    assert devices(h, 7) == {("apns", bad_topic), ("fcm", bad_argument), ("fcm", flaky)}


# One request's push events share a queue message ------------------------------------------


def _push_messages(h: InProcessHerald, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records the payload of every message published or retried on a push queue from
    now on (not a retry's move from the delay queue once it is due)."""
    payloads: list[Any] = []
    enqueue = h.broker.enqueue

    def spy(message: Any, **kwargs: Any) -> Any:
        moved = "retries" in message.options and not kwargs.get("delay")
        if message.queue_name.startswith("push.") and not moved:
            payloads.append(message.args[0])
        return enqueue(message, **kwargs)

    monkeypatch.setattr(h.broker, "enqueue", spy)
    return payloads


def _users_with_an_apns_device(h: InProcessHerald, users: tuple[int, ...]) -> dict[int, str]:
    """Adds `users`, each with one APNs device; returns {user: token}."""
    tokens = {}
    for user in users:
        add_user(h, user)
        tokens[user] = apns_token()
        add_device(h, user, "apns", tokens[user])
    return tokens


def _users_of(payload: Any) -> list[int]:
    return [e["user_id"] for e in (payload if isinstance(payload, list) else [payload])]


def test_a_requests_push_events_share_a_message_and_a_retry_carries_only_the_failed(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import intake.publisher

    monkeypatch.setattr(intake.publisher, "PUSH_EVENTS_PER_MESSAGE", 3)
    h = direct()
    tokens = _users_with_an_apns_device(h, (7, 8, 9, 10))
    fake_apns.script(tokens[8], [(503, "ServiceUnavailable", {})] * 2)
    messages = _push_messages(h, monkeypatch)

    progress = Progress()
    post(h, *(push_event(user) for user in (7, 8, 9, 10)))
    progress.wait(4)
    settle()
    # Three events to a message, in order; then two retries of user 8's event alone.
    assert [_users_of(m) for m in messages] == [[7, 8, 9], [10], [8], [8]]
    assert isinstance(messages[0], list) and isinstance(messages[2], dict)
    assert [r.status for r in apns_for(fake_apns, tokens[8])] == [503, 503, 200]
    for user in (7, 9, 10):
        assert [r.status for r in apns_for(fake_apns, tokens[user])] == [200]
    assert dead_letters(h) == []


def test_events_of_a_shared_message_run_out_of_tries_as_dead_letters_of_their_own(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns,
) -> None:
    h = direct(RETRY_MAX_TRIES="3")
    tokens = _users_with_an_apns_device(h, (7, 8, 9))
    for user in (8, 9):
        fake_apns.script(tokens[user], [(503, "ServiceUnavailable", {})] * 20)
    mids = {user: new_id() for user in (7, 8, 9)}

    post(h, *(push_event(user, mids[user]) for user in (7, 8, 9)))
    wait_until(lambda: len(dead_letters(h)) >= 2, what="two dead letters")
    settle()
    letters = dead_letters(h)
    assert len(letters) == 2
    assert sorted(letter["user_id"] for letter in letters) == [8, 9]
    for letter in letters:
        # Each letter holds its own event, ready to replay alone.
        [event] = letter["payload"]["args"]
        assert event["user_id"] == letter["user_id"]
        assert event["message"]["id"] == mids[letter["user_id"]]
        assert letter["attempts"] == 3
        assert "gave up after 3 tries" in letter["reason"]
        assert len(apns_for(fake_apns, tokens[letter["user_id"]])) == 3
    assert [r.status for r in apns_for(fake_apns, tokens[7])] == [200]


def test_a_refused_event_of_a_shared_message_is_dead_lettered_alone(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald],
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    _bouncer_user(h, fake_bouncer, 7)
    _bouncer_user(h, fake_bouncer, 8)
    mids = {7: new_id(), 8: new_id()}

    fake_bouncer.fail_next(400, msg="Invalid token for this realm")
    progress = Progress()
    post(h, push_event(7, mids[7]), push_event(8, mids[8]))
    progress.wait(1)  # the other event
    [letter] = wait_until(lambda: dead_letters(h), what="dead letter")
    settle()
    notified = fake_bouncer.received("push/notify")
    [refused] = [r for r in notified if r.status == 400]
    [accepted] = [r for r in notified if r.status == 200]
    assert len(notified) == 2  # neither is retried
    refused_user = int(refused.fields["user_id"])
    assert {refused_user, int(accepted.fields["user_id"])} == {7, 8}
    assert letter["reason"] == "Invalid token for this realm"
    assert letter["attempts"] == 1
    [event] = letter["payload"]["args"]
    assert (event["user_id"], event["message"]["id"]) == (refused_user, mids[refused_user])


# 8. Sharding ----------------------------------------------------------------------------


def test_push_shards_route_each_user_to_its_queue_and_actor(
    direct: Callable[..., InProcessHerald], fake_fcm: FakeFcm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actors.push import PushActor

    handled: list[tuple[int, int]] = []
    original = PushActor.handle

    def recording(self: PushActor, works: Any) -> None:
        for work in works:
            if isinstance(work.event, MessageEvent):
                handled.append((self.shard, work.event.user_id))
        original(self, works)

    monkeypatch.setattr(PushActor, "handle", recording)
    h = direct(PUSH_SHARDS="3")
    queued: list[str] = []
    enqueue = h.broker.enqueue

    def spy(message: Any, **kwargs: Any) -> Any:
        queued.append(message.queue_name)
        return enqueue(message, **kwargs)

    monkeypatch.setattr(h.broker, "enqueue", spy)
    tokens = {}
    for user in (3, 4, 5):
        add_user(h, user)
        tokens[user] = fcm_token()
        add_device(h, user, "fcm", tokens[user])

    mid = new_id()
    events = {user: push_event(user, mid) for user in (3, 4, 5)}
    for user, event in events.items():
        assert [q for q, _ in h.api.publisher.routes(parse_event(event))] == [
            f"push.shard{user % 3}"]
    progress = [Progress(f"push.shard{n}") for n in range(3)]
    post(h, *events.values())
    for p in progress:
        p.wait(1)
    assert sorted(queued) == ["push.shard0", "push.shard1", "push.shard2"]
    for user in (3, 4, 5):
        [sent] = fcm_for(fake_fcm, tokens[user])
        assert sent.data["user_id"] == str(user)
    assert sorted(handled) == [(0, 3), (1, 4), (2, 5)]

    # message_deleted goes to every shard; each removes its own users' pushes.
    post(h, {"type": "message_deleted", "message_ids": [mid]})
    for user in (3, 4, 5):
        wait_for_requests(fake_fcm, tokens[user], 2)
        assert fcm_event(fcm_for(fake_fcm, tokens[user])[1]) == ("remove", str(mid))
    for p in progress:
        p.wait(2)
    settle()
    assert all(len(fcm_for(fake_fcm, tokens[u])) == 2 for u in (3, 4, 5))


# 9. Settings ----------------------------------------------------------------------------


def test_push_disabled_users_and_bots_get_nothing(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct()
    add_user(h, 7, enable_offline_push_notifications=False)
    add_user(h, 8, is_bot=True)
    add_user(h, 9)
    tokens = {user: (apns_token(), fcm_token()) for user in (7, 8, 9)}
    for user, (apple, android) in tokens.items():
        add_device(h, user, "apns", apple)
        add_device(h, user, "fcm", android)
    progress = Progress()
    post(h, push_event(7), push_event(8), push_event(9))
    progress.wait(3)
    settle()
    for user in (7, 8):
        assert apns_for(fake_apns, tokens[user][0]) == []
        assert fcm_for(fake_fcm, tokens[user][1]) == []
    assert len(apns_for(fake_apns, tokens[9][0])) == 1
    assert len(fcm_for(fake_fcm, tokens[9][1])) == 1


# 10. Bouncer ----------------------------------------------------------------------------


def _registered(fake: FakeBouncer) -> set[tuple[int, str]]:
    return {(r.kind, r.token) for r in fake.devices()}


def _bouncer_user(h: InProcessHerald, fake: FakeBouncer, user_id: int) -> tuple[str, str]:
    add_user(h, user_id)
    apple, android = apns_token(), fcm_token()
    progress = Progress()
    add_device(h, user_id, "apns", apple)
    add_device(h, user_id, "fcm", android)
    progress.wait(2)  # the two register commands went through the push queue
    assert {(TOKEN_KIND_APNS, apple), (TOKEN_KIND_FCM, android)} <= _registered(fake)
    return apple, android


def test_bouncer_notify_carries_zulip_fields_and_devices_sync(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald]
) -> None:
    import models

    h = start(**bouncer_env(fake_bouncer))
    apple, android = _bouncer_user(h, fake_bouncer, 7)
    user_uuid = h.db(lambda: models.User.get_by_id(7).uuid)
    [registration] = [r for r in fake_bouncer.devices() if r.token == apple]
    assert registration.user_uuid == user_uuid and registration.ios_app_id == IOS_APP_ID

    mid = new_id()
    before = _steps()
    progress = Progress()
    post(h, push_event(7, mid))
    [notify] = wait_until(lambda: fake_bouncer.received("push/notify"), what="notify")
    progress.wait(1)
    # Through the bouncer too, the push is timed stage by stage.
    assert [_steps()[stage][0] - before[stage][0] for stage in ("plan", "send", "record")] \
        == [1, 1, 1]
    fields = notify.fields
    assert notify.status == 200
    assert fields["user_id"] == 7 and fields["user_uuid"] == user_uuid
    assert fields["apple_devices"] == [apple] and fields["android_devices"] == [android]
    assert fields["gcm_options"] == {"priority": "high"}
    assert fields["apns_payload"]["aps"]["alert"] == {
        "title": "#design > logo", "subtitle": "Ada mentioned you:", "body": "Hello there"}
    assert fields["apns_payload"]["zulip"]["zulip_message_id"] == mid
    gcm = fields["gcm_payload"]
    assert gcm["event"] == "message" and gcm["zulip_message_id"] == str(mid)
    assert gcm["server"] == "chat.example.com" and gcm["sender_full_name"] == "Ada"
    assert all(isinstance(v, str) for v in gcm.values())
    assert {(p.token, p.delivered) for p in fake_bouncer.pushes} == {
        (apple, True), (android, True)}

    # A read goes through the bouncer as a remove.
    post(h, read_event(7, mid))
    wait_until(lambda: len(fake_bouncer.received("push/notify")) == 2, what="remove notify")
    remove = fake_bouncer.received("push/notify")[1].fields
    assert remove["gcm_options"] == {"priority": "normal"}
    assert remove["gcm_payload"]["event"] == "remove"
    assert remove["gcm_payload"]["zulip_message_ids"] == str(mid)
    assert remove["apns_payload"]["zulip"]["event"] == "remove"

    # Removing a device unregisters it at the bouncer.
    response = h.client.request("DELETE", "/v1/users/7/devices",
                                json={"kind": "fcm", "token": android})
    assert response.status_code == 204
    wait_until(lambda: _registered(fake_bouncer) == {(TOKEN_KIND_APNS, apple)},
               what="device unregistered at the bouncer")
    [unregister] = fake_bouncer.received("push/unregister")
    assert unregister.status == 200 and unregister.fields["token_kind"] == "2"


def _broker_refuses_commands(h: InProcessHerald, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker is away")

    monkeypatch.setattr(h.api.publisher, "command", refuse)


def test_a_device_added_again_after_its_register_was_lost_reaches_the_bouncer(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    add_user(h, 7)
    token = fcm_token()
    body = {"kind": "fcm", "token": token}
    with monkeypatch.context() as patch:
        _broker_refuses_commands(h, patch)
        response = h.client.post("/v1/users/7/devices", json=body)
        assert response.status_code == 503, response.text
    assert devices(h, 7) == {("fcm", token)}  # stored, but the bouncer never heard

    # The client retries: the device is there already, and the register goes out.
    progress = Progress()
    response = h.client.post("/v1/users/7/devices", json=body)
    assert response.status_code == 200, response.text
    progress.wait(1)
    assert _registered(fake_bouncer) == {(TOKEN_KIND_FCM, token)}
    # Registering again is a no-op at the bouncer, not a failure.
    progress = Progress()
    assert h.client.post("/v1/users/7/devices", json=body).status_code == 200
    progress.wait(1)
    assert [r.status for r in fake_bouncer.received("push/register")] == [200, 200]
    assert _registered(fake_bouncer) == {(TOKEN_KIND_FCM, token)}
    assert dead_letters(h) == []


def test_a_device_removed_again_after_its_unregister_was_lost_leaves_the_bouncer(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    apple, android = _bouncer_user(h, fake_bouncer, 7)
    body = {"kind": "fcm", "token": android}
    with monkeypatch.context() as patch:
        _broker_refuses_commands(h, patch)
        response = h.client.request("DELETE", "/v1/users/7/devices", json=body)
        assert response.status_code == 503, response.text
    # Nothing told the bouncer, so the device stays for the retry to find.
    assert devices(h, 7) == {("apns", apple), ("fcm", android)}

    response = h.client.request("DELETE", "/v1/users/7/devices", json=body)
    assert response.status_code == 204, response.text
    wait_until(lambda: _registered(fake_bouncer) == {(TOKEN_KIND_APNS, apple)},
               what="device unregistered at the bouncer")
    assert devices(h, 7) == {("apns", apple)}
    # A device herald no longer has is not sent to the bouncer again, which would refuse
    # a token it does not know and leave a dead letter.
    response = h.client.request("DELETE", "/v1/users/7/devices", json=body)
    assert response.status_code == 404, response.text
    settle()
    assert [r.status for r in fake_bouncer.received("push/unregister")] == [200]
    assert dead_letters(h) == []


def test_a_device_the_bouncer_no_longer_has_is_removed_without_a_dead_letter(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald]
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    apple, android = _bouncer_user(h, fake_bouncer, 7)
    # The bouncer dropped the registration on its own (its provider called it invalid).
    fake_bouncer.forget(android)

    response = h.client.request("DELETE", "/v1/users/7/devices",
                                json={"kind": "fcm", "token": android})
    assert response.status_code == 204, response.text
    wait_until(lambda: fake_bouncer.received("push/unregister"), what="the unregister")
    settle()
    assert [r.status for r in fake_bouncer.received("push/unregister")] == [400]
    assert devices(h, 7) == {("apns", apple)}
    assert dead_letters(h) == []


def test_bouncer_deleted_devices_are_deleted_locally(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald]
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    apple, android = _bouncer_user(h, fake_bouncer, 7)
    fake_bouncer.mark_dead(android)
    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    assert devices(h, 7) == {("apns", apple)}
    assert {(p.token, p.delivered) for p in fake_bouncer.pushes} == {
        (apple, True), (android, False)}


def test_bouncer_5xx_is_retried_and_4xx_dead_lettered(
    fake_bouncer: FakeBouncer, start: Callable[..., InProcessHerald]
) -> None:
    h = start(**bouncer_env(fake_bouncer))
    _bouncer_user(h, fake_bouncer, 7)

    fake_bouncer.fail_next(503, 2)
    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    assert [r.status for r in fake_bouncer.received("push/notify")] == [503, 503, 200]
    assert dead_letters(h) == []

    fake_bouncer.fail_next(400, msg="Invalid token for this realm")
    mid = new_id()
    post(h, push_event(7, mid))
    [letter] = wait_until(lambda: dead_letters(h), what="dead letter")
    settle()
    assert [r.status for r in fake_bouncer.received("push/notify")] == [503, 503, 200, 400]
    assert letter["kind"] == "queue_message"
    assert letter["reason"] == "Invalid token for this realm"
    assert letter["attempts"] == 1
    assert letter["payload"]["args"][0]["message"]["id"] == mid


# 11-12. Redaction and dry run ------------------------------------------------------------


def test_redacted_content_says_new_message(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns, fake_fcm: FakeFcm
) -> None:
    h = direct(PUSH_REDACT_CONTENT="1")
    apple, android = user_with_both_devices(h, 7)
    post(h, push_event(7, content="<p>the launch code is 0000</p>"))
    [request] = wait_until(lambda: apns_for(fake_apns, apple), what="APNs push")
    [sent] = wait_until(lambda: fcm_for(fake_fcm, android), what="FCM push")
    assert request.body["aps"]["alert"]["body"] == "New message"
    assert request.body["zulip"]["content"] == "New message"
    assert sent.data["content"] == "New message"
    assert "0000" not in repr(request.body) and "0000" not in repr(sent.data)


def test_a_message_nested_too_deep_for_a_recursive_walk_still_pushes_once(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns
) -> None:
    h = direct()
    apple = _users_with_an_apns_device(h, (7,))[7]
    post(h, push_event(7, content="<p>Heads up</p>" + "<b>" * 3000 + "deep"))
    [request] = wait_until(lambda: apns_for(fake_apns, apple), what="APNs push")
    assert request.body["aps"]["alert"]["body"] == "Heads up"
    settle()
    assert len(apns_for(fake_apns, apple)) == 1
    assert dead_letters(h) == []


def test_dry_run_without_providers_completes_and_counts_each_device(
    start: Callable[..., InProcessHerald]
) -> None:
    h = start()
    add_user(h, 7)
    add_device(h, 7, "apns", apns_token())
    add_device(h, 7, "fcm", fcm_token())
    before = {p: sample("herald_pushes_total", provider=p, outcome="dry_run")
              for p in ("apns", "fcm")}
    progress = Progress()
    post(h, push_event(7))
    progress.wait(1)
    for provider in ("apns", "fcm"):
        after = sample("herald_pushes_total", provider=provider, outcome="dry_run")
        assert after - before[provider] == 1
    assert dead_letters(h) == []


# 13. Supervision ------------------------------------------------------------------------


def shard_router_urn(h: InProcessHerald) -> str:
    router = h.tree.routers().shard
    assert router is not None
    return router.actor_urn


def test_crashed_push_actor_is_restarted_and_siblings_are_untouched(
    direct: Callable[..., InProcessHerald], fake_apns: FakeApns,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actors.push import PushActor

    h = direct(PUSH_SHARDS="2")
    add_user(h, 2)  # shard 0
    add_user(h, 3)  # shard 1
    healthy, victim = apns_token(), apns_token()
    add_device(h, 2, "apns", healthy)
    add_device(h, 3, "apns", victim)
    urns = wait_until(lambda: len(push_actor_urns()) == 2 and push_actor_urns(),
                      what="two PushActors")
    router_urn = shard_router_urn(h)

    armed: list[bool] = []
    faults: list[int] = []
    original = PushActor.handle

    def faulty(self: PushActor, works: Any) -> None:
        if self.shard == 1 and armed and not faults and isinstance(works[0].event,
                                                                    MessageEvent):
            faults.append(works[0].event.message.id)
            time.sleep(0.3)  # the next push queues up in the mailbox meanwhile
            raise RuntimeError("injected fault")
        original(self, works)

    monkeypatch.setattr(PushActor, "handle", faulty)

    # Shard 1 has a push in flight (APNs answers slowly) when its actor crashes on the
    # next one; a third waits in the crashed actor's mailbox, and a fourth arrives while
    # the crashed actor is still winding down (waiting for the push in flight).
    fake_apns.delay = 1.0
    in_flight, crash_a, crash_b, during = (new_id() for _ in range(4))
    post(h, push_event(3, in_flight))
    wait_until(lambda: apns_for(fake_apns, victim), what="first push to reach APNs")
    armed.append(True)
    post(h, push_event(3, crash_a))
    post(h, push_event(3, crash_b))  # a message of its own, to wait in the mailbox
    wait_until(lambda: faults, what="the injected fault")
    time.sleep(0.4)
    post(h, push_event(3, during))
    fake_apns.delay = 0.0

    def victim_ids() -> set[str]:
        return {apns_event(r)[1] for r in apns_for(fake_apns, victim) if r.status == 200}

    expected = {str(m) for m in (in_flight, crash_a, crash_b, during)}
    wait_until(lambda: victim_ids() >= expected, timeout=20,
               what="every push of the crashed shard delivered")
    after = wait_until(lambda: len(push_actor_urns()) == 2 and push_actor_urns(),
                       what="two PushActors again")
    assert after[1] != urns[1], "shard 1 was not restarted"
    assert after[0] == urns[0], "shard 0 was restarted too"
    assert shard_router_urn(h) == router_urn, "the ShardRouter was restarted"

    later = new_id()
    post(h, push_event(3, later), push_event(2))
    wait_until(lambda: str(later) in victim_ids(), what="a later push on the restarted shard")
    wait_until(lambda: apns_for(fake_apns, healthy), what="a push on the sibling shard")
    assert push_actor_urns() == after
    assert h.gave_up == []
