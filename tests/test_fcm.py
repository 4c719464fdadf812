"""FcmSender against FakeFcm: a real token endpoint and a real FCM v1 endpoint on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delivery.fcm import FcmSender, parse_retry_after
from delivery.outcomes import Outcome, SendResult
from tests.fakes.fcm import FakeFcm, make_service_account

DATA = {"event": "message", "zulip_message_id": "1001", "sender_full_name": "Ada"}


@pytest.fixture
def fake() -> Iterator[FakeFcm]:
    server = FakeFcm()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def creds(fake: FakeFcm, tmp_path: Path) -> str:
    return fake.new_service_account(tmp_path)


def send(
    creds: str,
    endpoint: str,
    token: str,
    *,
    data: dict[str, str] = DATA,
    priority: str = "high",
    **options: Any,
) -> SendResult:
    async def go() -> SendResult:
        async with FcmSender(credentials_file=creds, endpoint=endpoint, **options) as sender:
            return await sender.send(token, data=data, priority=priority)

    return asyncio.run(go())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("priority", ["high", "normal"])
def test_success_sends_data_and_android_priority(fake: FakeFcm, creds: str, priority: str) -> None:
    result = send(creds, fake.url, "device-1", priority=priority)

    assert result.outcome is Outcome.DELIVERED and result.ok
    [request] = fake.sent()
    assert request.project == "herald-test"
    assert request.token == "device-1"
    assert request.data == DATA
    assert request.priority == priority
    assert fake.token_grants == 1


@pytest.mark.parametrize("code", ["UNREGISTERED", "SENDER_ID_MISMATCH"])
def test_dead_token_is_invalid_device(fake: FakeFcm, creds: str, code: str) -> None:
    fake.script("dead", [(0, code, {})])

    result = send(creds, fake.url, "dead")

    assert result.outcome is Outcome.INVALID_DEVICE
    assert code in result.reason


@pytest.mark.parametrize(("code", "status"), [("UNAVAILABLE", 503), ("INTERNAL", 500)])
def test_server_errors_are_transient_and_not_retried_inside(
    fake: FakeFcm, creds: str, code: str, status: int
) -> None:
    fake.script("tok", [(status, code, {})])

    result = send(creds, fake.url, "tok")

    assert result.outcome is Outcome.TRANSIENT
    assert code in result.reason and f"HTTP {status}" in result.reason
    assert result.retry_after is None
    # One attempt only: retries (with back-off) are the caller's.
    assert len(fake.sent()) == 1


def test_quota_exceeded_carries_retry_after(fake: FakeFcm, creds: str) -> None:
    fake.script("busy", [(429, "QUOTA_EXCEEDED", {"Retry-After": "37"})])

    result = send(creds, fake.url, "busy")

    assert result.outcome is Outcome.TRANSIENT
    assert "QUOTA_EXCEEDED" in result.reason
    assert result.retry_after == 37.0


def test_unavailable_with_http_date_retry_after(fake: FakeFcm, creds: str) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    fake.script("tok", [(503, "UNAVAILABLE", {"Retry-After": when})])

    result = send(creds, fake.url, "tok")

    assert result.outcome is Outcome.TRANSIENT
    assert result.retry_after is not None and 100 < result.retry_after <= 120


def test_invalid_argument_is_permanent(fake: FakeFcm, creds: str) -> None:
    fake.script("bad", [(400, "INVALID_ARGUMENT", {})])

    result = send(creds, fake.url, "bad")

    assert result.outcome is Outcome.PERMANENT
    assert "INVALID_ARGUMENT" in result.reason


def test_other_4xx_without_fcm_code_is_permanent(fake: FakeFcm, creds: str) -> None:
    fake.script("tok", [(403, None, {})])

    result = send(creds, fake.url, "tok")

    assert result.outcome is Outcome.PERMANENT
    assert "PERMISSION_DENIED" in result.reason


def test_script_is_consumed_in_order_then_success(fake: FakeFcm, creds: str) -> None:
    fake.script("tok", [(503, "UNAVAILABLE", {}), (500, "INTERNAL", {})])

    async def go() -> list[SendResult]:
        async with FcmSender(credentials_file=creds, endpoint=fake.url) as sender:
            return [await sender.send("tok", data=DATA, priority="high") for _ in range(3)]

    results = asyncio.run(go())

    assert [r.outcome for r in results] == [
        Outcome.TRANSIENT,
        Outcome.TRANSIENT,
        Outcome.DELIVERED,
    ]
    assert "UNAVAILABLE" in results[0].reason and "INTERNAL" in results[1].reason
    # One access token serves every send.
    assert fake.token_grants == 1


def test_token_endpoint_refuses_assertion_signed_with_another_key(
    fake: FakeFcm, creds: str, tmp_path: Path
) -> None:
    # Same service-account e-mail as the trusted file, but a freshly generated key.
    impostor = make_service_account(
        tmp_path,
        fake.token_uri,
        client_email="herald-sender@herald-test.iam.gserviceaccount.com",
    )

    result = send(impostor, fake.url, "tok")

    assert result.outcome is Outcome.PERMANENT
    assert "invalid_grant" in result.reason
    assert fake.token_refusals == 1 and fake.token_grants == 0
    assert fake.sent() == []
    # The genuine key still works against the same fake.
    assert send(creds, fake.url, "tok").ok


def test_unknown_service_account_is_refused(fake: FakeFcm, tmp_path: Path) -> None:
    stranger = make_service_account(tmp_path, fake.token_uri)  # never trusted

    result = send(stranger, fake.url, "tok")

    assert result.outcome is Outcome.PERMANENT
    assert fake.sent() == []


def test_project_id_override_goes_into_the_url(fake: FakeFcm, creds: str) -> None:
    # The fake only lets a service account send for its own project.
    result = send(creds, fake.url, "tok", project_id="some-other-project")

    assert result.outcome is Outcome.PERMANENT
    assert "PERMISSION_DENIED" in result.reason


def test_timeout_is_transient(fake: FakeFcm, creds: str) -> None:
    fake.delay = 2.0

    started = time.monotonic()
    result = send(creds, fake.url, "slow", timeout=0.3)

    assert result.outcome is Outcome.TRANSIENT
    assert "timeout" in result.reason
    assert time.monotonic() - started < 2.0


def test_connection_refused_is_transient(fake: FakeFcm, creds: str) -> None:
    result = send(creds, f"http://127.0.0.1:{free_port()}", "tok", timeout=2)

    assert result.outcome is Outcome.TRANSIENT
    assert "connection" in result.reason


def test_unreachable_token_endpoint_is_transient(tmp_path: Path) -> None:
    creds = make_service_account(tmp_path, f"http://127.0.0.1:{free_port()}/token")

    result = send(creds, f"http://127.0.0.1:{free_port()}", "tok", timeout=1)

    assert result.outcome is Outcome.TRANSIENT


def test_two_senders_with_different_endpoints_in_one_process(tmp_path: Path) -> None:
    first, second = FakeFcm(), FakeFcm()
    first.start()
    second.start()
    try:
        creds_first = first.new_service_account(tmp_path, project_id="first")
        creds_second = second.new_service_account(tmp_path, project_id="second")

        async def go() -> list[SendResult]:
            a = FcmSender(credentials_file=creds_first, endpoint=first.url)
            b = FcmSender(credentials_file=creds_second, endpoint=second.url)
            try:
                return list(
                    await asyncio.gather(
                        a.send("to-first", data={"n": "1"}, priority="high"),
                        b.send("to-second", data={"n": "2"}, priority="normal"),
                        a.send("to-first-again", data={"n": "3"}, priority="high"),
                    )
                )
            finally:
                await a.close()
                await b.close()

        assert all(result.ok for result in asyncio.run(go()))
        assert sorted(str(r.token) for r in first.sent()) == ["to-first", "to-first-again"]
        assert {r.project for r in first.sent()} == {"first"}
        assert [(r.token, r.project) for r in second.sent()] == [("to-second", "second")]
    finally:
        first.stop()
        second.stop()


def test_hundreds_of_concurrent_sends(fake: FakeFcm, creds: str) -> None:
    fake.delay = 0.05
    tokens = [f"device-{i}" for i in range(300)]
    fake.script("device-7", [(0, "UNREGISTERED", {})])
    fake.script("device-200", [(0, "UNAVAILABLE", {})])

    async def go() -> tuple[list[SendResult], list[SendResult]]:
        async with FcmSender(credentials_file=creds, endpoint=fake.url) as sender:
            many = await sender.send_many(tokens[:250], data=DATA, priority="high")
            singles = await asyncio.gather(
                *(sender.send(t, data=DATA, priority="normal") for t in tokens[250:])
            )
            return many, list(singles)

    many, singles = asyncio.run(go())

    assert len(many) == 250
    assert many[7].outcome is Outcome.INVALID_DEVICE
    assert many[200].outcome is Outcome.TRANSIENT
    assert sum(r.ok for r in many) == 248
    assert len(singles) == 50 and all(r.ok for r in singles)
    assert len(fake.sent()) == 300
    assert fake.token_grants == 1


def _loop_stall_during(work: Any) -> tuple[Any, float]:
    """Run `work()` (a coroutine function) on a fresh event loop beside a ticker that
    sleeps 10 ms at a time; returns work's result and the longest the ticker waited."""

    async def go() -> tuple[Any, float]:
        longest = 0.0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal longest
            while not done.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                longest = max(longest, time.monotonic() - before)

        ticker = asyncio.create_task(tick())
        try:
            return await work(), longest
        finally:
            done.set()
            await ticker

    return asyncio.run(go())


def test_a_revoked_access_token_is_replaced_off_the_event_loop(
    fake: FakeFcm, creds: str
) -> None:
    async def work() -> tuple[SendResult, SendResult]:
        async with FcmSender(credentials_file=creds, endpoint=fake.url) as sender:
            first = await sender.send("device-1", data=DATA, priority="high")
            fake.revoke_access_tokens()
            fake.token_delay = 1.0
            return first, await sender.send("device-2", data=DATA, priority="high")

    (first, second), stall = _loop_stall_during(work)

    assert first.ok and second.ok
    assert fake.unauthenticated == 1
    assert fake.token_grants == 2
    assert [r.token for r in fake.sent()] == ["device-1", "device-2"]
    # The new token took a second to come; the loop went on meanwhile.
    assert stall < 0.5


def test_a_burst_refused_with_401_shares_one_new_token(fake: FakeFcm, creds: str) -> None:
    tokens = [f"device-{i}" for i in range(50)]

    async def go() -> list[SendResult]:
        async with FcmSender(credentials_file=creds, endpoint=fake.url) as sender:
            await sender.send("warm", data=DATA, priority="high")
            fake.revoke_access_tokens()
            return await sender.send_many(tokens, data=DATA, priority="high")

    results = asyncio.run(go())

    assert all(r.ok for r in results)
    assert fake.unauthenticated == 50
    assert fake.token_grants == 2
    assert sorted(str(r.token) for r in fake.sent()) == sorted([*tokens, "warm"])


def test_a_token_endpoint_too_slow_after_a_401_is_transient(fake: FakeFcm, creds: str) -> None:
    async def work() -> list[SendResult]:
        async with FcmSender(credentials_file=creds, endpoint=fake.url, timeout=0.5) as sender:
            await sender.send("warm", data=DATA, priority="high")
            fake.revoke_access_tokens()
            fake.token_delay = 3.0
            return await sender.send_many(["a", "b", "c"], data=DATA, priority="high")

    started = time.monotonic()
    results, stall = _loop_stall_during(work)

    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * 3
    assert all("access token" in r.reason for r in results)
    # One fetch, cut at the sender's timeout, answers all three.
    assert time.monotonic() - started < 2.5
    assert stall < 0.3
    assert [r.token for r in fake.sent()] == ["warm"]


def test_a_service_account_refused_after_a_401_is_permanent(
    fake: FakeFcm, creds: str, tmp_path: Path
) -> None:
    async def go() -> SendResult:
        async with FcmSender(credentials_file=creds, endpoint=fake.url) as sender:
            await sender.send("warm", data=DATA, priority="high")
            fake.revoke_access_tokens()
            fake.distrust_all()
            return await sender.send("device-1", data=DATA, priority="high")

    result = asyncio.run(go())

    assert result.outcome is Outcome.PERMANENT
    assert "access token refused" in result.reason
    assert fake.token_refusals == 1


def test_bad_priority_is_refused(fake: FakeFcm, creds: str) -> None:
    with pytest.raises(ValueError):
        send(creds, fake.url, "tok", priority="urgent")


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("12", 12.0), (" 3 ", 3.0), ("soon", None), ("-5", None)],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected
