"""BouncerClient against FakeBouncer: Zulip's remote push API on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from delivery.bouncer import BouncerClient, BouncerRequestError, BouncerResult
from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from tests.fakes.bouncer import TOKEN_KIND_APNS, TOKEN_KIND_FCM, FakeBouncer

T = TypeVar("T")

USER_UUID = "9c5bd1d4-8e4a-4a5e-9d8e-0d6d2b4f3a11"
REALM_UUID = "3f0c7a52-1b2d-4c1e-8f5a-6a7b8c9d0e1f"
APNS_TOKEN = "a1b2c3d4" * 8
FCM_TOKEN = "fcm-token-1"
GCM_PAYLOAD = {"event": "message", "zulip_message_id": "1001", "content": "hello"}
APNS_PAYLOAD = {"aps": {"alert": {"title": "Ada", "body": "hello"}}, "zulip": {}}


@pytest.fixture
def fake() -> Iterator[FakeBouncer]:
    server = FakeBouncer()
    server.start()
    yield server
    server.stop()


def run(
    fake: FakeBouncer,
    action: Callable[[BouncerClient], Awaitable[T]],
    *,
    api_key: str | None = None,
    server_uuid: str | None = None,
    url: str | None = None,
    timeout: float = 5.0,
) -> T:
    async def go() -> T:
        client = BouncerClient(
            url or fake.url,
            server_uuid or fake.server_uuid,
            fake.api_key if api_key is None else api_key,
            timeout=timeout,
        )
        async with client:
            return await action(client)

    return asyncio.run(go())


def notify(**overrides: Any) -> Callable[[BouncerClient], Awaitable[BouncerResult]]:
    arguments: dict[str, Any] = {
        "user_id": 7,
        "user_uuid": USER_UUID,
        "realm_uuid": None,
        "apns_payload": APNS_PAYLOAD,
        "gcm_payload": GCM_PAYLOAD,
        "gcm_options": {"priority": "high"},
        "android_devices": [FCM_TOKEN],
        "apple_devices": [APNS_TOKEN],
    }
    arguments.update(overrides)
    return lambda client: client.notify(**arguments)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_register_notify_unregister_round_trip(fake: FakeBouncer) -> None:
    async def register_both(client: BouncerClient) -> None:
        await client.register(
            user_id=7, user_uuid=USER_UUID, token=FCM_TOKEN, token_kind="fcm", ios_app_id=None
        )
        await client.register(
            user_id=7,
            user_uuid=USER_UUID,
            token=APNS_TOKEN,
            token_kind="apns",
            ios_app_id="org.zulip.Zulip",
        )

    run(fake, register_both)

    devices = {(d.kind, d.token, d.ios_app_id) for d in fake.devices()}
    assert devices == {
        (TOKEN_KIND_FCM, FCM_TOKEN, None),
        (TOKEN_KIND_APNS, APNS_TOKEN, "org.zulip.Zulip"),
    }
    fcm_form = fake.received("push/register")[0].fields
    assert fcm_form == {
        "user_id": "7",
        "user_uuid": USER_UUID,
        "token": FCM_TOKEN,
        "token_kind": "2",
    }
    assert fake.received("push/register")[1].fields["token_kind"] == "1"

    result = run(fake, notify(realm_uuid=REALM_UUID))

    assert result == BouncerResult(
        total_android_devices=1,
        total_apple_devices=1,
        deleted_android_devices=[],
        deleted_apple_devices=[],
    )
    body = fake.received("push/notify")[0].fields
    assert body == {
        "user_id": 7,
        "user_uuid": USER_UUID,
        "realm_uuid": REALM_UUID,
        "apns_payload": APNS_PAYLOAD,
        "gcm_payload": GCM_PAYLOAD,
        "gcm_options": {"priority": "high"},
        "android_devices": [FCM_TOKEN],
        "apple_devices": [APNS_TOKEN],
    }
    pushed = {(p.kind, p.token): p.payload for p in fake.pushes}
    assert pushed == {
        (TOKEN_KIND_FCM, FCM_TOKEN): GCM_PAYLOAD,
        (TOKEN_KIND_APNS, APNS_TOKEN): APNS_PAYLOAD,
    }

    async def unregister_both(client: BouncerClient) -> None:
        await client.unregister(user_id=7, user_uuid=USER_UUID, token=FCM_TOKEN, token_kind="fcm")
        await client.unregister(user_id=7, user_uuid=USER_UUID, token=APNS_TOKEN, token_kind="apns")

    run(fake, unregister_both)
    assert fake.devices() == []

    # Devices we still send but the bouncer no longer has come back as deleted.
    after = run(fake, notify())
    assert (after.total_android_devices, after.total_apple_devices) == (0, 0)
    assert after.deleted_android_devices == [FCM_TOKEN]
    assert after.deleted_apple_devices == [APNS_TOKEN]


def test_dead_devices_are_reported_deleted(fake: FakeBouncer) -> None:
    fake.add_device(TOKEN_KIND_FCM, FCM_TOKEN, user_uuid=USER_UUID)
    fake.add_device(TOKEN_KIND_FCM, "fcm-token-2", user_uuid=USER_UUID)
    fake.add_device(TOKEN_KIND_APNS, APNS_TOKEN, user_uuid=USER_UUID, ios_app_id="org.zulip.Zulip")
    fake.mark_dead("fcm-token-2")
    fake.mark_dead(APNS_TOKEN)

    result = run(fake, notify(android_devices=[FCM_TOKEN, "fcm-token-2"]))

    assert result.total_android_devices == 2
    assert result.total_apple_devices == 1
    assert result.deleted_android_devices == ["fcm-token-2"]
    assert result.deleted_apple_devices == [APNS_TOKEN]
    assert [d.token for d in fake.devices()] == [FCM_TOKEN]
    assert {p.token: p.delivered for p in fake.pushes} == {
        FCM_TOKEN: True,
        "fcm-token-2": False,
        APNS_TOKEN: False,
    }


def test_legacy_user_id_registration_is_found(fake: FakeBouncer) -> None:
    fake.add_device(TOKEN_KIND_FCM, FCM_TOKEN, user_id=7)

    result = run(fake, notify(apple_devices=[]))

    assert result.total_android_devices == 1
    assert result.deleted_android_devices == []


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_transient(fake: FakeBouncer, status: int) -> None:
    fake.fail_next(status)

    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify())

    assert str(status) in caught.value.reason
    assert caught.value.retry_after is None
    # The failure was used up: the next call goes through.
    assert run(fake, notify()).deleted_android_devices == [FCM_TOKEN]


def test_5xx_with_retry_after(fake: FakeBouncer) -> None:
    fake.fail_next(503, headers={"Retry-After": "42"})

    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify())

    assert caught.value.retry_after == 42.0


def test_rate_limit_is_transient_with_retry_after(fake: FakeBouncer) -> None:
    fake.fail_next(
        429,
        msg="API usage exceeded rate limit",
        code="RATE_LIMIT_HIT",
        headers={"Retry-After": "7"},
    )

    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify())

    assert caught.value.retry_after == 7.0


def test_fail_next_counts_requests(fake: FakeBouncer) -> None:
    fake.fail_next(500, n=2)

    async def three(client: BouncerClient) -> list[str]:
        outcomes = []
        for _ in range(3):
            try:
                await notify()(client)
                outcomes.append("ok")
            except TransientDeliveryError:
                outcomes.append("transient")
        return outcomes

    assert run(fake, three) == ["transient", "transient", "ok"]


def test_timeout_is_transient(fake: FakeBouncer) -> None:
    fake.delay = 2.0

    started = time.monotonic()
    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify(), timeout=0.3)

    assert "timeout" in caught.value.reason
    assert time.monotonic() - started < 2.0


@contextlib.contextmanager
def raw_http_server(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Iterator[str]:
    """An HTTP/1.1 server on loopback, in a thread of its own, that reads each request
    and lets `answer` write the response as it likes (a bouncer behind a bad proxy).
    Yields its base URL."""
    loop = asyncio.new_event_loop()
    ready: queue.Queue[int] = queue.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    stop = asyncio.Event()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.put(server.sockets[0].getsockname()[1])
        await stop.wait()
        server.close()
        answering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in answering:
            task.cancel()
        await asyncio.gather(*answering, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    port = ready.get(timeout=5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=5)
        loop.close()


SUCCESS_BODY = (b'{"result": "success", "msg": "", "total_android_devices": 1, '
                b'"total_apple_devices": 0, '
                b'"deleted_devices": {"android_devices": [], "apple_devices": []}}')


def test_an_answer_that_trickles_in_is_cut_at_the_timeout() -> None:
    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(SUCCESS_BODY))
        for start in range(0, len(SUCCESS_BODY), 10):
            # Each read waits less than the timeout; the whole answer, far longer.
            writer.write(SUCCESS_BODY[start:start + 10])
            await writer.drain()
            await asyncio.sleep(0.4)

    with raw_http_server(trickle) as url:
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError) as caught:
            asyncio.run(_notify_once(url, timeout=1.0))

    assert "timeout" in caught.value.reason
    assert time.monotonic() - started < 2.5


def test_an_answer_that_cannot_be_decoded_is_transient() -> None:
    async def bad_gzip(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: gzip\r\nContent-Length: 7\r\n\r\nnotgzip")
        await writer.drain()

    with raw_http_server(bad_gzip) as url, pytest.raises(TransientDeliveryError) as caught:
        asyncio.run(_notify_once(url, timeout=5.0))

    assert "DecodingError" in caught.value.reason


def test_a_malformed_retry_after_is_ignored(fake: FakeBouncer) -> None:
    fake.fail_next(503, headers={"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"})

    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify())

    assert caught.value.retry_after is None


async def _notify_once(url: str, *, timeout: float) -> BouncerResult:
    async with BouncerClient(url, "server-uuid", "api-key", timeout=timeout) as client:
        return await notify()(client)


def test_connection_refused_is_transient(fake: FakeBouncer) -> None:
    with pytest.raises(TransientDeliveryError) as caught:
        run(fake, notify(), url=f"http://127.0.0.1:{free_port()}")

    assert "connection" in caught.value.reason


def test_4xx_is_permanent_with_the_bouncers_msg(fake: FakeBouncer) -> None:
    async def unregister(client: BouncerClient) -> None:
        await client.unregister(user_id=7, user_uuid=USER_UUID, token=FCM_TOKEN,
                                token_kind="fcm")

    fake.fail_next(400, msg="Invalid token kind")
    with pytest.raises(PermanentDeliveryError) as caught:
        run(fake, unregister)

    assert caught.value.reason == "Invalid token kind"
    assert isinstance(caught.value, BouncerRequestError) and caught.value.status == 400


def test_unregistering_a_token_the_bouncer_does_not_have_is_done(fake: FakeBouncer) -> None:
    async def unregister_unknown(client: BouncerClient) -> None:
        await client.unregister(user_id=7, user_uuid=USER_UUID, token="nope", token_kind="fcm")

    run(fake, unregister_unknown)

    assert [r.status for r in fake.received("push/unregister")] == [400]


def test_invalid_apns_token_is_permanent(fake: FakeBouncer) -> None:
    async def register_bad(client: BouncerClient) -> None:
        await client.register(
            user_id=7, user_uuid=None, token="not-hex", token_kind="apns", ios_app_id="a.b"
        )

    with pytest.raises(PermanentDeliveryError) as caught:
        run(fake, register_bad)

    assert "APNS token" in caught.value.reason
    assert fake.devices() == []


def test_scripted_4xx_msg(fake: FakeBouncer) -> None:
    fake.fail_next(
        400,
        msg="Your plan doesn't allow sending push notifications.",
        code="PUSH_NOTIFICATIONS_DISALLOWED",
    )

    with pytest.raises(BouncerRequestError) as caught:
        run(fake, notify())

    assert caught.value.reason == "Your plan doesn't allow sending push notifications."
    assert caught.value.code == "PUSH_NOTIFICATIONS_DISALLOWED"


@pytest.mark.parametrize("which", ["wrong key", "unknown server"])
def test_wrong_credentials_are_permanent(fake: FakeBouncer, which: str) -> None:
    fake.add_device(TOKEN_KIND_FCM, FCM_TOKEN, user_uuid=USER_UUID)
    with pytest.raises(PermanentDeliveryError) as caught:
        if which == "wrong key":
            run(fake, notify(), api_key="not-the-key")
        else:
            run(fake, notify(), server_uuid="00000000-0000-0000-0000-000000000000")

    error = caught.value
    assert isinstance(error, BouncerRequestError)
    assert error.status == 401 and error.code == "INVALID_ZULIP_SERVER"
    assert "auth failure" in error.reason
    assert fake.pushes == []


def test_apns_registration_needs_ios_app_id(fake: FakeBouncer) -> None:
    async def register(client: BouncerClient) -> None:
        await client.register(
            user_id=7, user_uuid=USER_UUID, token=APNS_TOKEN, token_kind="apns", ios_app_id=None
        )

    with pytest.raises(ValueError):
        run(fake, register)
    assert fake.received() == []


def test_concurrent_notifies(fake: FakeBouncer) -> None:
    fake.add_device(TOKEN_KIND_FCM, FCM_TOKEN, user_uuid=USER_UUID)
    fake.delay = 0.05

    async def many(client: BouncerClient) -> list[BouncerResult]:
        return list(await asyncio.gather(*(notify(apple_devices=[])(client) for _ in range(200))))

    results = run(fake, many)

    assert all(r.total_android_devices == 1 for r in results)
    assert len(fake.received("push/notify")) == 200
