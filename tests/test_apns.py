"""ApnsSender (real aioapns) against FakeApns (real HTTP/2 over TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from delivery import apns
from delivery.apns import (
    JWT_MIN_REFRESH_SECONDS,
    JWT_REFRESH_SECONDS,
    ApnsSender,
    ProviderToken,
    parse_endpoint,
    parse_retry_after,
)
from delivery.outcomes import MAX_RETRY_AFTER_SECONDS, Outcome, SendResult
from tests.fakes.apns import RESET_STREAM, FakeApns, make_apns_key

CLIENT_TOPIC = "org.herald.test"
DEVICE_TOPIC = "org.zulip.Zulip"
TOKEN = "ab" * 32
PAYLOAD: dict[str, Any] = {
    "aps": {"alert": {"title": "#design > logo", "subtitle": "Ada:", "body": "hi"}, "badge": 0},
    "zulip": {"event": "message", "zulip_message_id": 1001},
}

T = TypeVar("T")


@dataclass
class Key:
    path: str
    key_id: str
    team_id: str
    public_key: Any


@pytest.fixture
def key(tmp_path: Path) -> Key:
    return Key(*make_apns_key(tmp_path))


@pytest.fixture
def fake(key: Key) -> Iterator[FakeApns]:
    server = FakeApns(public_key=key.public_key, key_id=key.key_id, team_id=key.team_id)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_sender(fake: FakeApns, key: Key, **overrides: Any) -> ApnsSender:
    options: dict[str, Any] = {
        "topic": CLIENT_TOPIC,
        "key_file": key.path,
        "key_id": key.key_id,
        "team_id": key.team_id,
        "endpoint": fake.endpoint,
        "ca_file": fake.ca_file,
        "timeout": 5.0,
    }
    options.update(overrides)
    return ApnsSender(**options)


def run_with(sender: ApnsSender, work: Callable[[ApnsSender], Awaitable[T]]) -> T:
    """Run ``work(sender)`` in a fresh event loop, closing the sender afterwards."""

    async def main() -> T:
        try:
            return await work(sender)
        finally:
            await sender.close()

    return asyncio.run(main())


def send_one(sender: ApnsSender, token: str = TOKEN, **kwargs: Any) -> SendResult:
    kwargs.setdefault("topic", DEVICE_TOPIC)
    kwargs.setdefault("payload", PAYLOAD)
    return run_with(sender, lambda s: s.send(token, **kwargs))


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_success_sends_the_right_headers(fake: FakeApns, key: Key) -> None:
    expiration = int(time.time()) + 24 * 3600
    result = send_one(
        make_sender(fake, key), expiration=expiration, priority=10, collapse_key="m1001"
    )
    assert result == SendResult(Outcome.DELIVERED)
    assert result.ok
    [request] = fake.requests
    assert request.token == TOKEN
    assert request.status == 200
    assert request.topic == DEVICE_TOPIC  # the device's app id, not the client's topic
    assert request.push_type == "alert"
    assert request.priority == 10
    assert request.collapse_id == "m1001"
    assert request.expiration is not None and abs(request.expiration - expiration) <= 2
    assert request.apns_id
    assert request.body == PAYLOAD
    assert request.headers["authorization"].startswith("bearer ")
    assert len(fake.provider_tokens) == 1


def test_background_push_without_expiration(fake: FakeApns, key: Key) -> None:
    result = send_one(
        make_sender(fake, key), payload={"aps": {"badge": 0}}, push_type="background", priority=5
    )
    assert result.outcome is Outcome.DELIVERED
    [request] = fake.requests
    assert request.push_type == "background"
    assert request.priority == 5
    assert request.expiration is None


def test_token_signed_with_another_key_is_refused(fake: FakeApns, key: Key, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_path, _, _, _ = make_apns_key(other_dir)
    # Same key id and team, different private key: the signature does not verify.
    result = send_one(make_sender(fake, key, key_file=other_path))
    assert result.outcome is Outcome.PERMANENT
    assert result.reason == "InvalidProviderToken"


def test_token_with_wrong_team_is_refused(fake: FakeApns, key: Key) -> None:
    result = send_one(make_sender(fake, key, team_id="WRONGTEAM1"))
    assert (result.outcome, result.reason) == (Outcome.PERMANENT, "InvalidProviderToken")


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (410, "Unregistered"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
        (410, "ExpiredToken"),
    ],
)
def test_dead_device_tokens(fake: FakeApns, key: Key, status: int, reason: str) -> None:
    fake.script(TOKEN, [(status, reason, {})])
    result = send_one(make_sender(fake, key))
    assert result.outcome is Outcome.INVALID_DEVICE
    assert result.reason == reason
    assert result.retry_after is None


def test_service_unavailable_is_transient(fake: FakeApns, key: Key) -> None:
    fake.script(TOKEN, [(503, "ServiceUnavailable", {})])
    result = send_one(make_sender(fake, key))
    assert (result.outcome, result.reason, result.retry_after) == (
        Outcome.TRANSIENT,
        "ServiceUnavailable",
        None,
    )


def test_too_many_requests_carries_retry_after(fake: FakeApns, key: Key) -> None:
    fake.script(TOKEN, [(429, "TooManyRequests", {"Retry-After": "2"})])
    result = send_one(make_sender(fake, key))
    assert result.outcome is Outcome.TRANSIENT
    assert result.reason == "TooManyRequests"
    assert result.retry_after == 2


def test_expired_provider_token_is_transient(fake: FakeApns, key: Key) -> None:
    fake.script(TOKEN, [(403, "ExpiredProviderToken", {})])
    result = send_one(make_sender(fake, key))
    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, "ExpiredProviderToken")


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "BadTopic"), (413, "PayloadTooLarge"), (400, "BadExpirationDate")],
)
def test_other_client_errors_are_permanent(
    fake: FakeApns, key: Key, status: int, reason: str
) -> None:
    fake.script(TOKEN, [(status, reason, {})])
    result = send_one(make_sender(fake, key))
    assert (result.outcome, result.reason) == (Outcome.PERMANENT, reason)


def test_scripted_answers_are_consumed_in_order(fake: FakeApns, key: Key) -> None:
    fake.script(TOKEN, [(500, "InternalServerError", {}), (410, "Unregistered", {})])

    async def three(sender: ApnsSender) -> list[Outcome]:
        return [
            (await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).outcome
            for _ in range(3)
        ]

    outcomes = run_with(make_sender(fake, key), three)
    assert outcomes == [Outcome.TRANSIENT, Outcome.INVALID_DEVICE, Outcome.DELIVERED]


def test_slow_answer_times_out_and_the_connection_survives(fake: FakeApns, key: Key) -> None:
    fake.delay = 1.0

    async def work(sender: ApnsSender) -> tuple[SendResult, SendResult]:
        slow = await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)
        fake.delay = 0.0
        await asyncio.sleep(1.0)  # the late answer to the first send arrives meanwhile
        return slow, await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)

    slow, after = run_with(make_sender(fake, key, timeout=0.3), work)
    assert (slow.outcome, slow.reason) == (Outcome.TRANSIENT, "timeout")
    assert after.outcome is Outcome.DELIVERED
    assert fake.connections_total == 1
    assert fake.streams_reset == 1  # the abandoned stream was cancelled, not left open


def test_timeouts_do_not_use_up_the_connections_streams(key: Key) -> None:
    # A hung server with 5 streams per connection: 10 timeouts in a row must each free
    # their stream, or the pool would be exhausted and the last send could not go out.
    server = FakeApns(
        public_key=key.public_key,
        key_id=key.key_id,
        team_id=key.team_id,
        delay=30.0,
        max_concurrent_streams=5,
    )
    server.start()
    try:

        async def work(sender: ApnsSender) -> tuple[list[SendResult], SendResult]:
            hung = [
                await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD) for _ in range(10)
            ]
            server.delay = 0.0
            return hung, await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)

        hung, last = run_with(make_sender(server, key, timeout=0.1, max_connections=1), work)
        assert [r.reason for r in hung] == ["timeout"] * 10
        assert last.outcome is Outcome.DELIVERED
        assert server.connections_total == 1
        assert wait_until(lambda: server.streams_reset == 10)
    finally:
        server.stop()


def test_streams_the_server_resets_do_not_use_up_the_connection(key: Key) -> None:
    # The server resets 10 streams in a row on a connection of 5: each send times out,
    # and each must give its stream back, or the last send could not go out.
    server = FakeApns(
        public_key=key.public_key, key_id=key.key_id, team_id=key.team_id,
        max_concurrent_streams=5,
    )
    server.start()
    try:
        server.script(TOKEN, [(RESET_STREAM, None, {})] * 10)

        async def work(sender: ApnsSender) -> tuple[list[SendResult], SendResult]:
            refused = [
                await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD) for _ in range(10)
            ]
            return refused, await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)

        refused, last = run_with(make_sender(server, key, timeout=0.2, max_connections=1),
                                 work)
        assert [r.outcome for r in refused] == [Outcome.TRANSIENT] * 10
        assert last.outcome is Outcome.DELIVERED
        assert server.connections_total == 1
    finally:
        server.stop()


def test_connection_refused_is_transient(key: Key) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = ApnsSender(
        topic=CLIENT_TOPIC,
        key_file=key.path,
        key_id=key.key_id,
        team_id=key.team_id,
        endpoint=f"127.0.0.1:{port}",
        timeout=5.0,
    )
    started = time.monotonic()
    result = send_one(sender)
    assert result.outcome is Outcome.TRANSIENT
    assert result.reason.startswith("connection error")
    assert time.monotonic() - started < 5.0


def test_untrusted_server_certificate_is_transient(fake: FakeApns, key: Key) -> None:
    result = send_one(make_sender(fake, key, ca_file=None))
    assert result.outcome is Outcome.TRANSIENT
    assert fake.requests == []


def test_concurrent_sends_share_few_connections_and_one_token(fake: FakeApns, key: Key) -> None:
    tokens = [f"{i:064x}" for i in range(300)]

    async def burst(sender: ApnsSender) -> list[SendResult]:
        return await asyncio.gather(
            *(sender.send(t, topic=DEVICE_TOPIC, payload=PAYLOAD) for t in tokens)
        )

    results = run_with(make_sender(fake, key, max_connections=2), burst)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert sorted(r.token for r in fake.requests) == sorted(tokens)
    assert 1 <= fake.connections_total <= 2
    assert len(fake.provider_tokens) == 1


class _CountingTransport:
    """Writes through to the real transport, noting the size of each write."""

    def __init__(self, transport: Any) -> None:
        self.real = transport
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_requests_made_in_one_turn_of_the_loop_go_out_in_one_write(
    fake: FakeApns, key: Key
) -> None:
    tokens = [f"{i:064x}" for i in range(10)]

    async def burst(sender: ApnsSender) -> tuple[list[SendResult], list[int]]:
        assert (await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).ok
        assert sender._client is not None
        (connection,) = sender._client.pool.connections
        counting = _CountingTransport(connection.transport)
        connection.transport = counting  # type: ignore[assignment]
        results = await asyncio.gather(
            *(sender.send(t, topic=DEVICE_TOPIC, payload=PAYLOAD) for t in tokens)
        )
        return results, [size for size in counting.writes if size]

    results, writes = run_with(make_sender(fake, key, max_connections=1), burst)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert sorted(r.token for r in fake.requests) == sorted([TOKEN, *tokens])
    # One TLS record and one wake-up of the server for the lot, not one per request.
    assert 1 <= len(writes) < len(tokens) // 2


def test_burst_larger_than_the_flow_control_window(fake: FakeApns, key: Key) -> None:
    # 300 bodies of ~3 KB on one fresh connection: far more than its 64 KiB window.
    big = {"aps": {"alert": {"body": "x" * 3000}}}
    tokens = [f"{i:064x}" for i in range(300)]

    async def burst(sender: ApnsSender) -> tuple[list[SendResult], float]:
        started = time.monotonic()
        results = await asyncio.gather(
            *(sender.send(t, topic=DEVICE_TOPIC, payload=big) for t in tokens)
        )
        return results, time.monotonic() - started

    results, elapsed = run_with(make_sender(fake, key, max_connections=1), burst)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    # Each push sent once, whole (no stranded half-sent streams, no resends).
    assert sorted(r.token for r in fake.requests) == sorted(tokens)
    assert all(r.body == big for r in fake.requests)
    assert elapsed < 1.0


def test_pool_grows_to_its_cap_when_streams_run_out(key: Key) -> None:
    server = FakeApns(
        public_key=key.public_key,
        key_id=key.key_id,
        team_id=key.team_id,
        # Long enough that no stream frees up while a new TLS connection is set up,
        # even on a loaded machine: the pool must grow because streams ran out.
        delay=1.0,
        max_concurrent_streams=50,
    )
    server.start()
    try:
        sender = make_sender(server, key, max_connections=3)

        async def burst(s: ApnsSender) -> list[SendResult]:
            # Warm up one connection so the server's SETTINGS are known before the burst.
            await s.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)
            return await asyncio.gather(
                *(s.send(f"{i:064x}", topic=DEVICE_TOPIC, payload=PAYLOAD) for i in range(200))
            )

        results = run_with(sender, burst)
        assert all(r.outcome is Outcome.DELIVERED for r in results)
        assert server.connections_total == 3
        # Connections share one provider token: Apple limits how often it may change.
        assert len(server.provider_tokens) == 1
    finally:
        server.stop()


def test_sequential_sends_reuse_one_connection_and_close_releases_it(
    fake: FakeApns, key: Key
) -> None:
    async def several(sender: ApnsSender) -> int:
        for _ in range(20):
            assert (await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).ok
        return sender.connection_count

    assert run_with(make_sender(fake, key), several) == 1
    assert fake.connections_total == 1
    assert wait_until(lambda: fake.connections_open == 0)


def test_an_idle_connection_closes_and_a_busy_one_stays_open(
    fake: FakeApns, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apns._HeraldProtocol, "INACTIVITY_TIME", 0.5)

    async def work(sender: ApnsSender) -> tuple[int, int, int]:
        for _ in range(8):  # in use for about 1.2 s, longer than the idle time
            assert (await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).ok
            await asyncio.sleep(0.15)
        busy = fake.connections_total
        for _ in range(50):  # then idle: closed once the idle time has passed
            await asyncio.sleep(0.1)
            if fake.connections_open == 0:
                break
        idle_open = fake.connections_open
        assert (await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).ok
        return busy, idle_open, fake.connections_total

    assert run_with(make_sender(fake, key), work) == (1, 0, 2)


def test_reconnects_after_the_server_drops_the_connection(fake: FakeApns, key: Key) -> None:
    async def work(sender: ApnsSender) -> list[SendResult]:
        first = await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)
        fake.close_connections()
        await asyncio.sleep(0.2)
        second = await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)
        return [first, second]

    results = run_with(make_sender(fake, key), work)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert fake.connections_total == 2


def test_certificate_authentication(fake: FakeApns) -> None:
    cert_file = fake.make_client_cert(CLIENT_TOPIC)
    sender = ApnsSender(
        topic=CLIENT_TOPIC,
        cert_file=cert_file,
        endpoint=fake.endpoint,
        ca_file=fake.ca_file,
        timeout=5.0,
    )
    result = send_one(sender)
    assert result.outcome is Outcome.DELIVERED
    [request] = fake.requests
    assert "authorization" not in request.headers
    assert request.topic == DEVICE_TOPIC


def test_client_certificate_from_another_ca_is_rejected(fake: FakeApns) -> None:
    stranger = FakeApns()  # never started: only its CA is used
    try:
        cert_file = stranger.make_client_cert(CLIENT_TOPIC)
        sender = ApnsSender(
            topic=CLIENT_TOPIC,
            cert_file=cert_file,
            endpoint=fake.endpoint,
            ca_file=fake.ca_file,
            timeout=5.0,
        )
        result = send_one(sender)
    finally:
        stranger.stop()
    assert result.outcome is Outcome.TRANSIENT
    assert fake.requests == []


def test_unusable_payload_and_push_type_fail_without_sending(fake: FakeApns, key: Key) -> None:
    async def work(sender: ApnsSender) -> list[SendResult]:
        return [
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload={"x": object()}),
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD, push_type="pigeon"),
        ]

    results = run_with(make_sender(fake, key), work)
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.PERMANENT]
    assert fake.requests == []


def test_provider_token_refresh_stays_within_apples_window(key: Key) -> None:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(Path(key.path).read_bytes(), password=None)
    now = [1_700_000_000.0]
    token = ProviderToken(private, key.key_id, key.team_id, clock=lambda: now[0])  # type: ignore[arg-type]
    first = token.get_header()
    now[0] += JWT_REFRESH_SECONDS - 1
    assert token.get_header() == first
    now[0] += 1
    second = token.get_header()
    assert second != first
    assert 20 * 60 <= JWT_MIN_REFRESH_SECONDS <= JWT_REFRESH_SECONDS < 60 * 60
    # "Expired" from the server is honoured only once Apple allows a refresh.
    now[0] += JWT_MIN_REFRESH_SECONDS - 1
    token.server_says_expired()
    assert token.get_header() == second
    now[0] += 1
    token.server_says_expired()
    assert token.get_header() != second


def test_config_errors_name_the_setting(tmp_path: Path, key: Key) -> None:
    with pytest.raises(ValueError, match="APNS_KEY_FILE or APNS_CERT_FILE"):
        ApnsSender(topic=CLIENT_TOPIC)
    with pytest.raises(ValueError, match="APNS_KEY_ID"):
        ApnsSender(topic=CLIENT_TOPIC, key_file=key.path, team_id=key.team_id)
    with pytest.raises(ValueError, match="APNS_KEY_FILE"):
        ApnsSender(
            topic=CLIENT_TOPIC,
            key_file=str(tmp_path / "missing.p8"),
            key_id=key.key_id,
            team_id=key.team_id,
        )
    with pytest.raises(ValueError, match="APNS_ENDPOINT"):
        ApnsSender(
            topic=CLIENT_TOPIC,
            key_file=key.path,
            key_id=key.key_id,
            team_id=key.team_id,
            endpoint="localhost:http",
        )


def test_parse_endpoint_and_retry_after() -> None:
    assert parse_endpoint("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_endpoint("api.push.apple.com") == ("api.push.apple.com", 443)
    assert parse_endpoint("[::1]:2197") == ("::1", 2197)
    assert parse_retry_after("2") == 2
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    # Malformed or absurd values must never reach the retry delay as inf or years.
    for bad in ("inf", "Infinity", "-inf", "nan", "1e999", "-5"):
        assert parse_retry_after(bad) is None, bad
    assert parse_retry_after("1e300") == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    # A year no clock reaches is malformed too, not an exception.
    assert parse_retry_after("Mon, 01 Jan 99999999999999999999 00:00:00 GMT") is None
    assert parse_retry_after("Mon, 01 Jan 9999 00:00:00 GMT") == MAX_RETRY_AFTER_SECONDS


def test_an_asctime_retry_after_is_read_as_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after("Wed Oct 21 07:28:00 2015", now=1445412470.0) == 10
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_malformed_retry_after_does_not_hide_an_invalid_device(
    fake: FakeApns, key: Key
) -> None:
    fake.script(TOKEN, [(410, "Unregistered",
                         {"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"})])

    result = send_one(make_sender(fake, key))

    assert result.outcome is Outcome.INVALID_DEVICE
    assert result.reason == "Unregistered"


def test_a_stream_limit_raised_by_the_server_is_used_in_full(key: Key) -> None:
    # APNs with token auth: one stream until a request with a valid token is answered.
    server = FakeApns(public_key=key.public_key, key_id=key.key_id, team_id=key.team_id,
                      delay=0.3, max_concurrent_streams=1, streams_once_accepted=1000)
    server.start()
    try:
        sender = make_sender(server, key, max_connections=1, timeout=10.0)

        async def burst(s: ApnsSender) -> tuple[list[SendResult], float]:
            # The limit is raised while this first push is the one stream in flight.
            assert (await s.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD)).ok
            started = time.monotonic()
            results = await asyncio.gather(
                *(s.send(f"{i:064x}", topic=DEVICE_TOPIC, payload=PAYLOAD) for i in range(300))
            )
            return results, time.monotonic() - started

        results, took = run_with(sender, burst)

        assert all(r.outcome is Outcome.DELIVERED for r in results)
        assert server.connections_total == 1
        # 300 answers of 0.3 s each: together, not a few at a time (that took 45 s or
        # ran into the timeout).
        assert took < 3.0
    finally:
        server.stop()


def test_a_payload_over_apples_limit_is_refused_without_sending(
    fake: FakeApns, key: Key
) -> None:
    def payload_of(size: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"aps": {"alert": {"body": ""}}}
        filler = size - len(json.dumps(payload, ensure_ascii=False).encode())
        payload["aps"]["alert"]["body"] = "é" * (filler // 2) + "x" * (filler % 2)
        assert len(json.dumps(payload, ensure_ascii=False).encode()) == size
        return payload

    async def work(sender: ApnsSender) -> list[SendResult]:
        return [
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=payload_of(4097)),
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=payload_of(70_000)),
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=payload_of(4096)),
            await sender.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD),
        ]

    results = run_with(make_sender(fake, key), work)

    assert [(r.outcome, r.reason) for r in results[:2]] == \
        [(Outcome.PERMANENT, "PayloadTooLarge")] * 2
    assert [r.outcome for r in results[2:]] == [Outcome.DELIVERED] * 2
    assert len(fake.requests) == 2


def test_close_ends_a_send_in_flight_without_sending_it_again(key: Key) -> None:
    server = FakeApns(public_key=key.public_key, key_id=key.key_id, team_id=key.team_id,
                      delay=1.0)
    server.start()
    try:
        sender = make_sender(server, key, timeout=5.0)

        async def close_midway(s: ApnsSender) -> SendResult:
            sending = asyncio.ensure_future(s.send(TOKEN, topic=DEVICE_TOPIC, payload=PAYLOAD))
            while not server.requests:  # the fake holds its answer for a second
                await asyncio.sleep(0.01)
            await s.close()
            return await sending

        result = run_with(sender, close_midway)

        assert result.outcome is Outcome.TRANSIENT
        assert result.reason == "sender closed"
        time.sleep(1.5)  # a send tried again would have reached the server by now
        assert len(server.requests) == 1
        assert wait_until(lambda: server.connections_open == 0)
    finally:
        server.stop()
