"""Nothing accepted is lost: a SIGKILLed worker's events are processed after restart;
SIGTERM drains and exits 0. Real processes, real brokers, real databases."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors._mail import MAIL_THREADS
from actors.runtime import PooledActor
from tests.conftest import message_event
from tests.fakes.fcm import FakeFcm
from tests.harness import (
    ROOT,
    HeraldProcess,
    InProcessHerald,
    as_outage_role,
    backend_env,
    database_outage,
    rabbit_queue_depth,
    wait_until,
)

pytestmark = pytest.mark.slow

USER = 7
OTHER_USER = 8
# How long a database restart refuses connections in these tests (seconds).
OUTAGE_SECONDS = 1.5


def _outbox(directory: Path) -> list[email.message.Message]:
    if not directory.exists():
        return []
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(directory.glob("*.eml"))]


def _put_user(client: object, period: int, user: int = USER) -> None:
    response = client.put(f"/v1/users/{user}", json={  # type: ignore[attr-defined]
        "email": f"user{user}@example.com", "full_name": "Ada",
        "email_batching_period_seconds": period})
    assert response.status_code == 200, response.text


def _one_pending_email(client: httpx.Client, period: int) -> dict[str, Any]:
    """Give USER a batching period, post one email event for them, and wait until its
    row is committed; returns the event."""
    _put_user(client, period=period)
    event = message_event(USER, channels=("email",))
    assert client.post("/v1/events", json=event).status_code == 202
    wait_until(lambda: _pending(client),
               what="the row to be committed")
    return event


def test_embedded_email_survives_sigkill_after_commit(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'herald.db'}", "OUTBOX_DIR": str(outbox)}
    first = HeraldProcess(env, "all", cwd=tmp_path).start()
    try:
        with first.client() as client:
            _one_pending_email(client, period=3)
        first.kill()  # before the window closes
        assert _outbox(outbox) == []
    finally:
        if first.proc and first.proc.poll() is None:
            first.proc.kill()
    with HeraldProcess(env, "all", cwd=tmp_path):
        mails = wait_until(lambda: _outbox(outbox), timeout=20, what="the email after restart")
        time.sleep(1.0)
        mails = _outbox(outbox)
        assert len(mails) == 1
        assert mails[0]["Subject"] == "#design > logo"


def test_rabbitmq_event_survives_sigkill_of_worker(tmp_path: Path) -> None:
    with backend_env("production", tmp_path) as env:
        outbox = tmp_path / "outbox"
        env = {**env, "OUTBOX_DIR": str(outbox)}
        web = HeraldProcess(env, "web", cwd=tmp_path).start()
        worker = HeraldProcess(env, "worker", cwd=tmp_path).start()
        try:
            with web.client() as client:
                _put_user(client, period=1)
                worker.kill()  # the worker dies; the web keeps accepting
                events = [message_event(USER, channels=("email",), topic=f"t{i}")
                          for i in range(5)]
                response = client.post("/v1/events", json={"events": events})
                assert response.status_code == 202
                # Durably queued in RabbitMQ, nobody consuming.
                assert rabbit_queue_depth(env["BROKER_URL"], "email") == 5
                assert _pending(client) == []
                restarted = HeraldProcess(env, "worker", cwd=tmp_path).start()
                try:
                    wait_until(lambda: len(_outbox(outbox)) == 5, timeout=30,
                               what="five emails after the worker restarted")
                    time.sleep(1.5)
                    subjects = sorted(m["Subject"] for m in _outbox(outbox))
                    assert subjects == [f"#design > t{i}" for i in range(5)]
                    assert rabbit_queue_depth(env["BROKER_URL"], "email") == 0
                    assert restarted.terminate() == 0
                finally:
                    if restarted.proc and restarted.proc.poll() is None:
                        restarted.proc.kill()
        finally:
            for p in (web, worker):
                if p.proc and p.proc.poll() is None:
                    p.proc.kill()


@dataclass
class _SlowFcmRig:
    """A web and a worker process on RabbitMQ + PostgreSQL, sending to a fake FCM;
    herald logs in as `OUTAGE_ROLE`, so `database_outage` can stand for a restart."""

    fake: FakeFcm
    env: dict[str, str]
    cwd: Path
    # The database as the test reads it: not locked out by `database_outage`.
    admin_url: str
    processes: list[HeraldProcess] = field(default_factory=list)

    def spawn(self, mode: str, *, locked_out: bool = True) -> HeraldProcess:
        """Start `python supervisor.py MODE`; with `locked_out=False` it logs in as
        the admin, so `database_outage` leaves it alone."""
        env = self.env if locked_out else {**self.env, "DATABASE_URL": self.admin_url}
        process = HeraldProcess(env, mode, cwd=self.cwd).start()
        self.processes.append(process)
        return process

    def user_with_device(self, client: httpx.Client, user: int, token: str) -> None:
        _put_user(client, period=60, user=user)
        response = client.post(f"/v1/users/{user}/devices", json={"kind": "fcm", "token": token})
        assert response.status_code == 201, response.text

    def receipts(self) -> int:
        import models

        return self._count(models.PushReceipt)

    def dead_letters(self) -> int:
        import models

        return self._count(models.DeadLetter)

    def _count(self, model: Any) -> int:
        import models

        database = models.make_database(self.admin_url)
        with database.bind_ctx([model]), database.connection_context():
            return int(model.select().count())


@contextlib.contextmanager
def _slow_fcm_rig(tmp_path: Path, delay: float, **extra: str) -> Iterator[_SlowFcmRig]:
    fake = FakeFcm(delay=delay)
    base = fake.start()
    try:
        credentials = fake.new_service_account(tmp_path)
        with backend_env("production", tmp_path) as admin_env:
            env = {**as_outage_role(admin_env), "FCM_CREDENTIALS": str(credentials),
                   "FCM_ENDPOINT": base, **extra}
            rig = _SlowFcmRig(fake, env, tmp_path, admin_env["DATABASE_URL"])
            try:
                yield rig
            finally:
                for process in rig.processes:
                    if process.proc and process.proc.poll() is None:
                        process.proc.kill()
    finally:
        fake.stop()


def test_sigkill_mid_processing_redelivers(tmp_path: Path) -> None:
    """The worker dies while a push is in flight (the provider is slow): the message
    was never acked, so the restarted worker delivers it."""
    with _slow_fcm_rig(tmp_path, delay=6.0) as rig:
        web, worker = rig.spawn("web"), rig.spawn("worker")
        with web.client() as client:
            rig.user_with_device(client, USER, "slow-1")
            event = message_event(USER, channels=("push",))
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: rig.fake.arrived == ["slow-1"], timeout=15,
                       what="the send to reach the slow provider")
            assert rig.fake.requests == [], "in flight: not answered yet"
            worker.kill()  # mid-send: the message is unacked
            rig.fake.delay = 0.0
            rig.spawn("worker")
            wait_until(lambda: rig.receipts() == 1, timeout=30,
                       what="the redelivered push to be accepted")
            wait_until(lambda: rabbit_queue_depth(rig.env["BROKER_URL"], "push.shard0") == 0,
                       what="the queue to drain")


def _has_at_least(outbox: Path, count: int) -> bool:
    return len(_outbox(outbox)) >= count


def _push_and_email_across(rig: _SlowFcmRig, outbox: Path,
                           outage: Callable[[], None]) -> None:
    """One event pushed and emailed, then `outage`, then another: each is pushed and
    emailed once, nothing is left queued, nothing is dead-lettered."""
    web = rig.spawn("web")
    with web.client() as client:
        rig.user_with_device(client, USER, "tok-1")
        _put_user(client, period=1)
        first = message_event(USER, topic="before")
        assert client.post("/v1/events", json=first).status_code == 202
        wait_until(lambda: len(rig.fake.requests) == 1 and len(_outbox(outbox)) == 1,
                   timeout=30, what="the first push and email")
        outage()
        second = message_event(USER, topic="after")
        response = wait_until(lambda: _accepted(client, second), timeout=30,
                              what="the second event to be accepted")
        assert response.status_code == 202, response.text
        wait_until(lambda: len(rig.fake.requests) == 2 and len(_outbox(outbox)) == 2,
                   timeout=60, what="the second push and email")
    time.sleep(2.0)  # time for a duplicate to show, were there one
    assert [r.data["zulip_message_id"] for r in rig.fake.requests] == [
        str(first["message"]["id"]), str(second["message"]["id"])]
    assert sorted(m["Subject"] for m in _outbox(outbox)) == [
        "#design > after", "#design > before"]
    assert rig.receipts() == 2
    for queue in ("push.shard0", "email"):
        assert rabbit_queue_depth(rig.env["BROKER_URL"], queue) == 0
    assert "dead letter" not in "".join(p.output() for p in rig.processes)


def _accepted(client: httpx.Client, event: dict[str, Any]) -> httpx.Response | None:
    """POST `event`; the answer, or None for a 503 (a dependency is unavailable: the
    client is told to retry, and nothing was queued)."""
    response = client.post("/v1/events", json=event)
    return None if response.status_code == 503 else response


def test_lost_database_connections_lose_no_event(tmp_path: Path) -> None:
    """PostgreSQL drops every connection of the web and the worker (a restart, a
    failover, an idle-connection killer): the events that come next are still pushed
    and emailed, each once, and nothing is dead-lettered."""
    outbox = tmp_path / "outbox"
    with _slow_fcm_rig(tmp_path, delay=0.0, OUTBOX_DIR=str(outbox),
                       RETRY_MIN_BACKOFF_MS="200", RETRY_MAX_BACKOFF_MS="1000") as rig:
        worker = rig.spawn("worker")
        _push_and_email_across(rig, outbox,
                               lambda: _assert_some(database_outage(OUTAGE_SECONDS)))
        # The batch's flush waited for the database instead of crashing its actor.
        assert "crashed" not in worker.output()


def test_worker_threads_that_stored_dead_letters_push_after_a_database_restart(
    tmp_path: Path,
) -> None:
    """Worker threads store dead letters for queue messages no event can be read from;
    then PostgreSQL drops every connection. The pushes that come next are delivered:
    no thread kept a connection from those writes, which would now be dead."""
    import dramatiq
    import pika

    with _slow_fcm_rig(tmp_path, delay=0.0, WORKER_THREADS="2", RETRY_MAX_TRIES="4",
                       RETRY_MIN_BACKOFF_MS="200", RETRY_MAX_BACKOFF_MS="1000") as rig:
        web, worker = rig.spawn("web", locked_out=False), rig.spawn("worker")
        with web.client() as client:
            rig.user_with_device(client, USER, "tok-1")
            assert client.post("/v1/events", json=message_event(
                USER, channels=("push",))).status_code == 202
            wait_until(lambda: rig.receipts() == 1, timeout=30, what="the first receipt")
            connection = pika.BlockingConnection(pika.URLParameters(rig.env["BROKER_URL"]))
            try:
                channel = connection.channel()
                for _ in range(10):
                    bogus: dramatiq.Message[Any] = dramatiq.Message(
                        queue_name="push.shard0", actor_name="push_shard0",
                        args=({"type": "bogus"},), kwargs={}, options={})
                    channel.basic_publish("", "push.shard0", bogus.encode(),
                                          pika.BasicProperties(delivery_mode=2))
            finally:
                connection.close()
            wait_until(lambda: rig.dead_letters() == 10, timeout=30, what="ten dead letters")
            assert database_outage(OUTAGE_SECONDS) > 0
            time.sleep(OUTAGE_SECONDS + 0.5)
            for _ in range(3):
                assert client.post("/v1/events", json=message_event(
                    USER, channels=("push",))).status_code == 202
            wait_until(lambda: rig.receipts() == 4, timeout=30,
                       what="the three pushes after the restart")
            assert rig.dead_letters() == 10
            # The broker's dead queue keeps its copies of the ten, and nothing else.
            assert rabbit_queue_depth(rig.env["BROKER_URL"], "push.shard0.XQ") == 10
        assert "crashed" not in worker.output()


def test_the_api_answers_as_usual_right_after_the_database_dropped_its_connections(
    tmp_path: Path,
) -> None:
    """PostgreSQL restarted (every connection dropped) while the web sat idle: the
    requests that come next are answered as usual. The pooled connections the server
    closed are noticed and replaced before use, not handed to a request to fail."""
    with _slow_fcm_rig(tmp_path, delay=0.0) as rig:
        web = rig.spawn("web")
        users = list(range(100, 124))
        with web.client() as client:
            # Requests at once: the pool keeps several connections.
            with concurrent.futures.ThreadPoolExecutor(8) as threads:
                assert set(threads.map(functools.partial(_put_status, client), users)) == {200}
            assert database_outage(0.0) > 1
            time.sleep(0.5)  # the server's goodbye reaches every socket
            assert [_put_status(client, user) for user in users] == [200] * len(users)


def _put_status(client: httpx.Client, user: int) -> int:
    response = client.put(f"/v1/users/{user}", json={
        "email": f"user{user}@example.com", "full_name": "Ada"})
    return response.status_code


def _assert_some(count: int) -> None:
    assert count > 0


def test_a_database_blip_as_many_batches_fall_due_sends_each_once(tmp_path: Path) -> None:
    """Many users' email batches fall due together just as PostgreSQL drops every
    connection: their flushes wait and try again instead of crashing their actors (so
    a blip does not use up the supervisor's restart budget), and each user gets one
    email per batch."""
    users = list(range(100, 130))
    outbox = tmp_path / "outbox"
    with _slow_fcm_rig(tmp_path, delay=0.0, OUTBOX_DIR=str(outbox)) as rig:
        web, worker = rig.spawn("web"), rig.spawn("worker")
        with web.client() as client:
            for user in users:
                _put_user(client, period=3, user=user)
            for round_ in (1, 2):
                started = time.time()
                events = [message_event(u, channels=("email",), topic=f"r{round_}")
                          for u in users]
                assert client.post("/v1/events", json={"events": events}).status_code == 202
                wait_until(lambda: all(client.get(f"/v1/users/{u}/pending").json()["pending"]
                                       for u in users), timeout=20, what="every batch to open")
                if round_ == 2:
                    # The database restarts just before the second round's batches
                    # fall due.
                    time.sleep(max(0.0, started + 3 - 0.3 - time.time()))
                    assert database_outage(OUTAGE_SECONDS) > 0
                wait_until(functools.partial(_has_at_least, outbox, len(users) * round_),
                           timeout=90, what=f"an email for every user, round {round_}")
        time.sleep(2.0)  # time for a duplicate to show, were there one
        sent = sorted((str(m["To"]), str(m["Subject"])) for m in _outbox(outbox))
        assert sent == sorted((f"Ada <user{u}@example.com>", f"#design > r{r}")
                              for u in users for r in (1, 2))
        log = worker.output()
        assert "crashed" not in log and "restarting" not in log, log


def test_a_period_change_during_a_database_restart_moves_the_window_without_a_crash(
    tmp_path: Path,
) -> None:
    """A user's batching period changes while the worker's database restarts: the
    batch's actor cannot read the new deadline, so it looks again a moment later
    (through a claim, which waits for the database) instead of crashing, and the
    email goes out once, at the new deadline."""
    outbox = tmp_path / "outbox"
    with _slow_fcm_rig(tmp_path, delay=0.0, OUTBOX_DIR=str(outbox),
                       RETRY_MIN_BACKOFF_MS="200") as rig:
        web = rig.spawn("web", locked_out=False)
        worker = rig.spawn("worker")
        with web.client() as client:
            _one_pending_email(client, period=600)
            assert database_outage(OUTAGE_SECONDS) > 0
            _put_user(client, period=1)  # the worker hears of it during the restart
            wait_until(functools.partial(_has_at_least, outbox, 1), timeout=30,
                       what="the email at the new deadline")
        time.sleep(1.5)
        assert len(_outbox(outbox)) == 1
        output = worker.output()
        assert "could not read the batch's deadline" in output
        assert "crashed" not in output


def test_lost_broker_connections_lose_no_event(tmp_path: Path) -> None:
    """RabbitMQ closes every connection of the web and the worker (a broker restart, a
    load balancer): both reconnect, the next events are pushed and emailed once, and
    nothing is dead-lettered."""
    outbox = tmp_path / "outbox"
    with _slow_fcm_rig(tmp_path, delay=0.0, OUTBOX_DIR=str(outbox),
                       RETRY_MIN_BACKOFF_MS="200", RETRY_MAX_BACKOFF_MS="1000") as rig:
        worker = rig.spawn("worker")
        vhost = rig.env["BROKER_URL"].rsplit("/", 1)[1]

        def close_connections() -> None:
            subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost,
                            "test: broker restart"], check=True, capture_output=True)

        _push_and_email_across(rig, outbox, close_connections)
        assert worker.proc is not None and worker.proc.poll() is None


def test_a_push_sent_as_the_database_goes_away_is_recorded_not_sent_again(
    tmp_path: Path,
) -> None:
    """The database drops its connections while a push waits for the provider's answer:
    the push went out, so its receipt is written once the database answers again, the
    message is acked, and the device is not sent the push a second time."""
    with _slow_fcm_rig(tmp_path, delay=2.0, RETRY_MIN_BACKOFF_MS="200") as rig:
        web, worker = rig.spawn("web"), rig.spawn("worker")
        with web.client() as client:
            rig.user_with_device(client, USER, "tok-1")
            warm = message_event(USER, channels=("push",))  # opens the connections
            assert client.post("/v1/events", json=warm).status_code == 202
            wait_until(lambda: rig.receipts() == 1, timeout=30, what="the first receipt")
            event = message_event(USER, channels=("push",))
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: rig.fake.arrived == ["tok-1", "tok-1"], timeout=15,
                       what="the second send to reach the provider")
            # Restarting from before the provider answers (in 2 s) until after.
            assert database_outage(4.0) > 0
            wait_until(lambda: rig.receipts() == 2, timeout=60, what="its receipt")
            wait_until(lambda: rabbit_queue_depth(rig.env["BROKER_URL"], "push.shard0") == 0,
                       what="the message to be acked")
            time.sleep(1.5)  # time for a second send to show, were there one
            assert [r.data["zulip_message_id"] for r in rig.fake.requests] == [
                str(warm["message"]["id"]), str(event["message"]["id"])]
            output = worker.output()
            assert "recording outcomes failed" in output, "the receipt waited for the database"
            assert "retrying" not in output


class _DropsTheDatabaseMidSend:
    """An aiosmtpd handler that, while herald's first email is in its hands, has the
    database restart (`database_outage`, `outage` seconds long), then accepts the
    email; the `refuse` emails after it are refused for now (451), and any later ones
    accepted."""

    def __init__(self, refuse: int = 0, outage: float = OUTAGE_SECONDS) -> None:
        self.refuse = refuse
        self.outage = outage
        self.received: list[bytes] = []
        self.refused = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.received:
            await asyncio.to_thread(database_outage, self.outage)
        elif self.refused < self.refuse:
            self.refused += 1
            return "451 4.3.0 try again later"
        self.received.append(bytes(envelope.original_content or b""))
        return "250 Message accepted for delivery"


@contextlib.contextmanager
def _smtp_server(handler: Any) -> Iterator[str]:
    """An aiosmtpd server on a free port; yields its SMTP_URL."""
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


@contextlib.contextmanager
def _mail_rig(tmp_path: Path, handler: Any,
              **env: str) -> Iterator[tuple[HeraldProcess, HeraldProcess]]:
    """A web (not locked out by `database_outage`) and a worker sending email to an
    aiosmtpd server with `handler`."""
    with _smtp_server(handler) as smtp_url, _slow_fcm_rig(
            tmp_path, delay=0.0, SMTP_URL=smtp_url, **env) as rig:
        yield rig.spawn("web", locked_out=False), rig.spawn("worker")


def _pending(client: httpx.Client) -> list[dict[str, Any]]:
    return client.get(f"/v1/users/{USER}/pending").json()["pending"]  # type: ignore[no-any-return]


def test_an_email_sent_as_the_database_goes_away_is_settled_not_sent_again(
    tmp_path: Path,
) -> None:
    """The database drops its connections while an email is on its way: the email is
    out, so the flush records that once the database answers again. The rows do not
    wait out their claim's lease to be sent a second time."""
    handler = _DropsTheDatabaseMidSend()
    with _mail_rig(tmp_path, handler, RETRY_MIN_BACKOFF_MS="200") as (web, worker):
        with web.client() as client:
            _put_user(client, period=1)
            event = message_event(USER, channels=("email",))
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: handler.received, timeout=30, what="the email")
            # Settled: nothing left pending for the user, well within the lease.
            wait_until(lambda: _pending(client) == [], timeout=20,
                       what="the sent rows to be settled")
        time.sleep(1.0)
        assert len(handler.received) == 1
        assert "crashed" not in worker.output()


def test_a_flush_half_sent_as_the_database_goes_away_settles_both_halves_once(
    tmp_path: Path,
) -> None:
    """One batch, two conversations: the first email goes out as the database drops
    its connections, the second is refused for now (451). The flush records both
    halves at once, when the database answers again: the sent email is not sent
    again, the refused one is tried again and sent once, and no actor crashes."""
    handler = _DropsTheDatabaseMidSend(refuse=1)
    with _mail_rig(tmp_path, handler, RETRY_MIN_BACKOFF_MS="200") as (web, worker):
        with web.client() as client:
            _put_user(client, period=2)
            in_stream = message_event(USER, channels=("email",))
            direct = message_event(USER, channels=("email",), stream=None)
            response = client.post("/v1/events", json={"events": [in_stream, direct]})
            assert response.status_code == 202, response.text
            wait_until(lambda: len(handler.received) == 2, timeout=30,
                       what="both emails, one of them on its second try")
            wait_until(lambda: _pending(client) == [], timeout=20,
                       what="the flush to be settled")
        time.sleep(1.5)
        assert (len(handler.received), handler.refused) == (2, 1)
        assert "the database call failed" in worker.output(), "the settle was asked again"
        subjects = {email.message_from_bytes(body)["Subject"] for body in handler.received}
        assert len(subjects) == 2, "one email per conversation, each sent once"
        assert "crashed" not in worker.output()


@pytest.mark.parametrize("database_back", [True, False],
                         ids=["database-back-by-the-stop", "database-still-away"])
def test_a_worker_stopped_while_a_settle_waits_settles_it_on_its_way_out(
    tmp_path: Path, database_back: bool,
) -> None:
    """An email goes out as the database restarts; its flush's settle fails and waits
    (8 s) to be asked again, and the worker is told to stop meanwhile, with the
    database back or still away. The settle is not dropped with the actor: the
    draining worker asks until the database answers, exits 0, and the sent rows are
    gone, so they do not go out again once their lease ends."""
    handler = _DropsTheDatabaseMidSend(outage=OUTAGE_SECONDS if database_back else 5.0)
    with _mail_rig(tmp_path, handler,
                   RETRY_MIN_BACKOFF_MS="8000", RETRY_MAX_BACKOFF_MS="20000") as (web, worker):
        with web.client() as client:
            _put_user(client, period=1)
            event = message_event(USER, channels=("email",))
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: "the database call failed" in worker.output(), timeout=30,
                       what="the settle to fail and wait to be asked again")
            if database_back:
                time.sleep(OUTAGE_SECONDS + 0.5)  # back; the actor still waits
            assert worker.terminate(timeout=60) == 0
            assert _pending(client) == []
        assert len(handler.received) == 1


# The longest an SMTP server or a test's stand-in holds something back (seconds); a
# failed test must not hang on it.
HOLD_LIMIT = 30.0


class _SlowSmtp:
    """An aiosmtpd handler that holds each email's DATA until `answer` is set or
    `hold` seconds have passed, then accepts it: a slow SMTP server. `arrived` counts
    the emails that reached it, `received` keeps those it accepted."""

    def __init__(self, hold: float = HOLD_LIMIT) -> None:
        self.hold = hold
        self.answer = threading.Event()
        self.arrived = 0
        self.received: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived += 1
        await asyncio.to_thread(self.answer.wait, self.hold)
        self.received.append(bytes(envelope.original_content or b""))
        return "250 Message accepted for delivery"


def test_sigterm_while_an_email_is_on_its_way_settles_it_and_it_goes_out_once(
    tmp_path: Path,
) -> None:
    """SIGTERM reaches a worker while its SMTP server holds an email's DATA (2 s): the
    worker waits for the send, records it as sent (its rows are deleted, not left
    claimed to go out again when the claim's lease ends), and exits 0. A worker
    started after it sends nothing more. The lease (300 s) is not configurable, so the
    rows being gone is what shows they will not go out again."""
    handler = _SlowSmtp(hold=2.0)
    with _mail_rig(tmp_path, handler) as (web, worker):
        with web.client() as client:
            _put_user(client, period=1)
            event = message_event(USER, channels=("email",))
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: handler.arrived == 1, timeout=30,
                       what="the email to reach the slow SMTP server")
            assert handler.received == [], "in flight: not answered yet"
            assert worker.terminate(timeout=60) == 0
            assert len(handler.received) == 1, "the send in flight was finished"
            assert _pending(client) == [], "its rows were settled on the way out"
            again = HeraldProcess(worker.env, "worker", cwd=tmp_path).start()
            try:
                time.sleep(3.0)  # time for a second send to show, were there one
                assert again.terminate(timeout=60) == 0
            finally:
                if again.proc and again.proc.poll() is None:
                    again.proc.kill()
        assert (handler.arrived, len(handler.received)) == (1, 1)
        assert "stopped" in worker.output()


def test_sigterm_hands_back_the_emails_not_yet_begun_and_finishes_those_on_their_way(
    tmp_path: Path,
) -> None:
    """More users' emails fall due at once than the worker has mail threads, and the
    SMTP server holds every email it gets. SIGTERM: the emails not begun yet never
    start, and their rows are handed back at once rather than left claimed for the
    lease; those on their way finish and are recorded. The next worker sends the rest
    straight away, and every user gets one email."""
    users = list(range(100, 100 + MAIL_THREADS + 2))
    handler = _SlowSmtp()
    with _mail_rig(tmp_path, handler) as (web, worker), web.client() as client:
        for user in users:
            _put_user(client, period=1, user=user)
        events = [message_event(user, channels=("email",)) for user in users]
        assert client.post("/v1/events", json={"events": events}).status_code == 202
        wait_until(lambda: handler.arrived == MAIL_THREADS, timeout=30,
                   what="an email on every mail thread")
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: f"for {MAIL_THREADS} email send(s) in flight" in worker.output(),
                   timeout=30, what="the stop to wait for the sends in flight")
        handler.answer.set()
        assert worker.proc.wait(60) == 0
        assert (handler.arrived, len(handler.received)) == (MAIL_THREADS, MAIL_THREADS)
        again = HeraldProcess(worker.env, "worker", cwd=tmp_path).start()
        try:
            wait_until(lambda: len(handler.received) == len(users), timeout=20,
                       what="the emails handed back, sent by the next worker")
            time.sleep(1.5)  # time for a second send to show, were there one
            assert again.terminate(timeout=60) == 0
        finally:
            if again.proc and again.proc.poll() is None:
                again.proc.kill()
        assert all(client.get(f"/v1/users/{user}/pending").json()["pending"] == []
                   for user in users)
    recipients = sorted(str(email.message_from_bytes(body)["To"]) for body in handler.received)
    assert recipients == sorted(f"Ada <user{user}@example.com>" for user in users)


class _PoolHog(PooledActor):
    """Takes a thread of the actor pool (`actor_pool`, set before start) until
    `release` is set: the pool busy with the stops of a worker's many other
    UserBatchActors, so the stop of the one whose email is on its way waits in its
    inbox.

    Parameters:
      running: set once the hog has its thread (on that pool thread).
      release: what the hog waits for before it lets the thread go.
    """

    def __init__(self, running: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.running = running
        self.release = release

    def on_start(self) -> None:
        self.running.set()
        self.release.wait(HOLD_LIMIT)


def _stop_behind_a_busy_pool(herald: InProcessHerald, stopping: threading.Thread,
                             running: threading.Event, release: threading.Event) -> None:
    """Take the actor pool's one thread (a `_PoolHog` until `release`), then start the
    stop: the UserBatchActors' stops wait in their inboxes when this returns."""
    batch_router = herald.tree.routers().batch
    assert herald.tree.pool is not None and batch_router is not None
    _PoolHog.actor_pool = herald.tree.pool
    _PoolHog.start(running, release)
    assert running.wait(10), "the hog has the pool's thread"
    stopping.start()
    wait_until(lambda: not batch_router.is_alive(), timeout=30,
               what="the batch router to stop (it tells its actors to stop)")
    time.sleep(0.2)  # its actors' stops are in their inboxes


def test_an_email_that_comes_back_while_its_actor_waits_to_stop_is_settled_once(
    tmp_path: Path,
) -> None:
    """A draining worker has told the user's actor to stop, but the actor pool is busy
    (one thread, taken) and the stop still waits in its inbox when the slow SMTP server
    accepts the email: what the send came to arrives behind the stop. It is not dropped
    with the actor's inbox: the rows are deleted before the worker has stopped, and a
    worker started after it sends nothing more. Real SMTP server, PostgreSQL and
    RabbitMQ; herald's parts in this process, to hold the pool at that moment."""
    handler = _SlowSmtp()
    running, release = threading.Event(), threading.Event()
    with _smtp_server(handler) as smtp_url, backend_env("production", tmp_path) as backend:
        env = {**backend, "SMTP_URL": smtp_url, "ACTOR_POOL_THREADS": "1"}
        first = InProcessHerald(env)
        stopping = threading.Thread(target=first.stop, name="test-stop")
        try:
            first.put_user(USER, email_batching_period_seconds=1)
            event = message_event(USER, channels=("email",))
            assert first.post_events(event).status_code == 202
            wait_until(lambda: handler.arrived == 1, timeout=30,
                       what="the email to reach the slow SMTP server")
            _stop_behind_a_busy_pool(first, stopping, running, release)
            handler.answer.set()
            wait_until(lambda: handler.received, timeout=10, what="the email to be accepted")
            time.sleep(0.5)  # the answer reaches the mail thread, which reports it
        finally:
            release.set()
            handler.answer.set()
            if stopping.ident is None:
                first.stop()  # the test failed before the stop began
            else:
                stopping.join(90)
        assert not stopping.is_alive(), "the worker stopped"
        again = InProcessHerald(env)
        try:
            rows = again.client.get(f"/v1/users/{USER}/pending").json()["pending"]
            assert rows == [], "the sent rows would go out again when their lease ends"
            time.sleep(1.0)  # time for a second send to show, were there one
        finally:
            again.stop()
        assert (handler.arrived, len(handler.received)) == (1, 1)


@pytest.mark.parametrize("answered", ["before-the-stop-is-handled", "after-the-stop"])
def test_a_claim_answered_behind_its_actors_stop_is_handed_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answered: str
) -> None:
    """A draining worker has told the user's actor to stop while the actor's claim is
    being served. The claim's answer reaches the actor's inbox behind the stop (the
    actor pool is busy), or comes after the actor has stopped. Either way the rows are
    handed back as the worker stops, and the next worker sends the email at once, not
    after the claim's five-minute lease. PostgreSQL and RabbitMQ; herald's parts in
    this process, to hold the claim and the pool at those moments."""
    from actors import _batch_store

    claiming, answer = threading.Event(), threading.Event()
    real_claim = _batch_store.claim_batches

    def held_claim(*args: Any) -> Any:
        result = real_claim(*args)
        if not claiming.is_set():
            claiming.set()
            answer.wait(HOLD_LIMIT)
        return result

    monkeypatch.setattr(_batch_store, "claim_batches", held_claim)
    running, release = threading.Event(), threading.Event()
    with backend_env("production", tmp_path) as backend:
        env = {**backend, "OUTBOX_DIR": str(tmp_path / "outbox"), "ACTOR_POOL_THREADS": "1"}
        first = InProcessHerald(env)
        stopping = threading.Thread(target=first.stop, name="test-stop")
        try:
            first.put_user(USER, email_batching_period_seconds=1)
            assert first.post_events(message_event(USER, channels=("email",))).status_code \
                == 202
            assert claiming.wait(30), "the window closes and the batch is claimed"
            _stop_behind_a_busy_pool(first, stopping, running, release)
            if answered == "after-the-stop":
                release.set()
                time.sleep(0.5)  # the actor has handled its stop
            answer.set()
            time.sleep(0.5)  # the claimer has told its answer
        finally:
            release.set()
            answer.set()
            if stopping.ident is None:
                first.stop()  # the test failed before the stop began
            else:
                stopping.join(90)
        assert not stopping.is_alive(), "the worker stopped"
        assert _outbox(tmp_path / "outbox") == [], "the stopping worker sent nothing"
        monkeypatch.setattr(_batch_store, "claim_batches", real_claim)
        again = InProcessHerald(env)
        try:
            mails = wait_until(lambda: _outbox(tmp_path / "outbox"), timeout=15,
                               what="the next worker to send the email")
        finally:
            again.stop()
        assert [m["To"] for m in mails] == [f"User {USER} <user{USER}@example.com>"]


def test_sigterm_keeps_a_pending_batch_and_exits_zero(tmp_path: Path) -> None:
    """Embedded: a batch still waiting for its window when SIGTERM comes is not sent early
    and not lost: it is there when herald starts again."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'herald.db'}",
           "OUTBOX_DIR": str(tmp_path / "outbox")}
    process = HeraldProcess(env, "all", cwd=tmp_path).start()
    with process.client() as client:
        event = _one_pending_email(client, period=120)
    assert process.terminate(timeout=60) == 0
    assert "stopped" in process.output()
    assert _outbox(tmp_path / "outbox") == []
    with HeraldProcess(env, "all", cwd=tmp_path) as again, again.client() as client:
        pending = _pending(client)
        assert [p["message_id"] for p in pending] == [event["message"]["id"]]


def test_sigterm_finishes_the_push_in_flight_and_hands_back_the_rest(tmp_path: Path) -> None:
    """A worker told to stop while a push waits on a slow provider finishes that push
    (answered, recorded, acked) and exits 0; an event that comes while it drains is left
    to the next worker. Each device gets its push exactly once."""
    with _slow_fcm_rig(tmp_path, delay=3.0) as rig:
        web, worker = rig.spawn("web"), rig.spawn("worker")
        with web.client() as client:
            rig.user_with_device(client, USER, "slow-1")
            rig.user_with_device(client, OTHER_USER, "later-1")
            first = message_event(USER, channels=("push",))
            assert client.post("/v1/events", json=first).status_code == 202
            wait_until(lambda: rig.fake.arrived == ["slow-1"], timeout=15,
                       what="the send to reach the slow provider")
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in worker.output(), what="the drain to start")
            second = message_event(OTHER_USER, channels=("push",))
            assert client.post("/v1/events", json=second).status_code == 202
            assert worker.proc.wait(60) == 0
            # The push in flight was answered, not cut off, and its receipt kept.
            assert [r.token for r in rig.fake.requests].count("slow-1") == 1
            assert rig.receipts() >= 1
            assert "stopped" in worker.output()
            rig.fake.delay = 0.0
            restarted = rig.spawn("worker")
            wait_until(lambda: rig.receipts() == 2, timeout=30,
                       what="the second push to be accepted")
            wait_until(lambda: rabbit_queue_depth(rig.env["BROKER_URL"], "push.shard0") == 0,
                       what="the queue to drain")
            assert sorted(str(r.token) for r in rig.fake.requests) == ["later-1", "slow-1"]
            assert restarted.terminate() == 0


@pytest.mark.parametrize("command", [["worker"], ["migrate"], ["dead-letters", "list"]])
def test_an_unreachable_database_at_start_up_stops_with_one_line(
    tmp_path: Path, command: list[str],
) -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test",
           "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/", "HERALD_SECRET_KEY": "s",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "supervisor.py"), *command], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 75
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herald: database unavailable: ")
    assert "127.0.0.1" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("backend", ["embedded", "production"])
def test_processes_started_at_once_on_a_new_database_migrate_it_once(
    tmp_path: Path, backend: str,
) -> None:
    """Migrations that are not idempotent (adding a column) run once however many
    processes start together on an empty database."""
    with backend_env(backend, tmp_path) as backend_vars:
        env = {**os.environ, **backend_vars, "PYTHONPATH": str(ROOT)}
        starts = [subprocess.Popen([sys.executable, str(ROOT / "supervisor.py"), "migrate"],
                                   env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outcomes = [(p.wait(60), *p.communicate()) for p in starts]
        assert [code for code, _, _ in outcomes] == [0, 0, 0], outcomes
        applied = [name for _, out, _ in outcomes if "nothing (up to date)" not in out
                   for name in out.strip().removeprefix("applied: ").split(", ")]
        assert sorted(applied) == sorted(set(applied)), "each migration applied once"
        assert any(name.startswith("003_") for name in applied)
        again = subprocess.run([sys.executable, str(ROOT / "supervisor.py"), "migrate"],
                               env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
        assert again.stdout.strip() == "applied: nothing (up to date)"


def test_bad_configuration_stops_with_one_line(tmp_path: Path) -> None:
    process = HeraldProcess({"PUSH_SHARDS": "many"}, "all", cwd=tmp_path).start(wait=False)
    assert process.proc is not None
    assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert len(lines) == 1 and "PUSH_SHARDS" in lines[0]


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://postgres@127.0.0.1:5432/test?sslmod=require", "'sslmod'"),
    ("postgresql://postgres@127.0.0.1:5432/test?sslmode=require&sslmode=disable",
     "sslmode is given 2 times"),
    ("sqlite:///", "needs a file path"),
])
def test_a_database_url_with_options_that_would_be_ignored_stops_with_one_line(
    tmp_path: Path, url: str, says: str
) -> None:
    process = HeraldProcess({"DATABASE_URL": url}, "all", cwd=tmp_path).start(wait=False)
    assert process.proc is not None
    assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herald: configuration error: DATABASE_URL")
    assert says in lines[0]


def test_postgres_connections_use_the_urls_parameters_and_keepalives(
    tmp_path: Path,
) -> None:
    with backend_env("production", tmp_path) as env:
        name = f"herald-{os.getpid()}-{time.monotonic_ns()}"
        url = f"{env['DATABASE_URL']}&application_name={name}&keepalives_idle=45"
        h = InProcessHerald({**env, "DATABASE_URL": url}, start_worker=False)
        try:
            import models

            dsn = h.db(lambda: models.db.connection().get_dsn_parameters())
            seen = h.db(lambda: models.db.execute_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (name,)).fetchone()[0])
        finally:
            h.stop()
    assert seen >= 1  # the server knows herald's sessions by the name the URL gave
    assert dsn["keepalives_idle"] == "45"  # the URL's own value wins
    assert (dsn["keepalives"], dsn["keepalives_count"], dsn["connect_timeout"]) == (
        "1", "3", "10")


def test_a_worker_that_could_not_sign_unsubscribe_links_does_not_start(
    tmp_path: Path,
) -> None:
    env = {"HERALD_API_KEYS": "", "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}
    process = HeraldProcess(env, "worker", cwd=tmp_path).start(wait=False)
    assert process.proc is not None
    assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("herald: configuration error: HERALD_SECRET_KEY: ")


def test_a_metrics_port_in_use_stops_the_process_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = HeraldProcess({"METRICS_PORT": str(port)}, "all", cwd=tmp_path)
        process.start(wait=False)
        assert process.proc is not None
        assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert lines[-1].startswith("herald: configuration error: METRICS_PORT: "), lines
    assert "Traceback" not in process.output()


def test_an_api_port_in_use_stops_the_process_before_it_consumes(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = HeraldProcess({}, "all", cwd=tmp_path)
        process.port = port
        process.env["PORT"] = str(port)
        process.start(wait=False)
        assert process.proc is not None
        assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert lines[-1] == (f"herald: configuration error: PORT: cannot listen on "
                         f"127.0.0.1:{port}: Address already in use"), lines
    assert "worker started" not in process.output()
    assert "Traceback" not in process.output()


@pytest.mark.parametrize("setting", ["APNS_KEY_FILE", "FCM_CREDENTIALS"])
def test_push_credentials_that_cannot_be_used_stop_the_worker_with_one_line(
    tmp_path: Path, setting: str
) -> None:
    broken = tmp_path / "broken"
    broken.write_text('{"type": "service_account"}')
    env = {setting: str(broken)}
    if setting == "APNS_KEY_FILE":
        env.update(APNS_KEY_ID="ABC123DEFG", APNS_TEAM_ID="TEAM123456", APNS_TOPIC="org.x")
    process = HeraldProcess(env, "all", cwd=tmp_path).start(wait=False)
    assert process.proc is not None
    assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"herald: configuration error: {setting}: "), lines[0]


@pytest.mark.parametrize("value", ["one", "0-", "2-1", "4096"])
def test_a_bad_cpu_affinity_stops_with_one_line(tmp_path: Path, value: str) -> None:
    process = HeraldProcess({"CPU_AFFINITY": value}, "all", cwd=tmp_path).start(wait=False)
    assert process.proc is not None
    assert process.wait_exit() == 2
    lines = process.output().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herald: configuration error: CPU_AFFINITY: ")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="pinning cannot be told apart from running anywhere on one CPU")
def test_cpu_affinity_keeps_every_thread_of_the_process_on_those_cpus(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    with HeraldProcess({"CPU_AFFINITY": str(cpu)}, "all", cwd=tmp_path) as process:
        assert process.proc is not None
        # An event recorded first, so the threads started on demand exist too.
        with process.client() as client:
            _one_pending_email(client, period=60)
        threads = list(Path(f"/proc/{process.proc.pid}/task").iterdir())
        allowed = {(task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
                   for task in threads}
        assert len(threads) > 10 and allowed == {str(cpu)}
        assert process.terminate() == 0
