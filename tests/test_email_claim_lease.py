"""Two workers' email sides on one PostgreSQL, one of them with a backlog of emails to
send: an email that waited past its claim's lease is not sent after another worker has
taken its rows and sent them. Time is scaled down (a lease of 4 s instead of 300 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from email.message import Message as MimeMessage
from email.utils import parseaddr

import pytest

from events import parse_event
from tests.conftest import message_event
from tests.harness import InProcessHerald, pg_schema, wait_until

pytestmark = pytest.mark.slow

# Seconds: the claim's lease, each of the backlog's slow sends, the sweep's interval.
LEASE = 4.0
SLOW_SEND = 3.0
SWEEP = 0.5
# Users whose emails are slow to send (the backlog), and the one queued behind them
# (its batch falls due a second after theirs).
SLOW_USERS = (4, 5, 6)
WAITING_USER = 7


class _Mailer:
    """A mailer that notes who sent what; some recipients take `SLOW_SEND` seconds."""

    def __init__(self, worker: str, sent: list[tuple[str, str]], lock: threading.Lock,
                 slow: tuple[str, ...] = ()) -> None:
        self.worker, self.sent, self.lock, self.slow = worker, sent, lock, slow
        self.started: list[tuple[str, str]] = []

    def send(self, message: MimeMessage) -> None:
        to = parseaddr(str(message["To"]))[1]
        with self.lock:
            self.started.append((self.worker, to))
        if any(f"user{u}@" in to for u in SLOW_USERS) and self.slow:
            time.sleep(SLOW_SEND)
        with self.lock:
            self.sent.append((self.worker, to))

    def close(self) -> None:
        pass


@pytest.fixture
def scaled_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import actors._batch_store as store
    import actors._mail as mail
    import actors.batch as batch

    monkeypatch.setattr(store, "CLAIM_LEASE_SECONDS", LEASE)
    monkeypatch.setattr(batch, "SWEEP_INTERVAL_SECONDS", SWEEP)
    monkeypatch.setattr(mail, "MAIL_THREADS", 1)  # one email at a time: a backlog


@pytest.fixture
def herald() -> Iterator[InProcessHerald]:
    with pg_schema() as url:
        h = InProcessHerald({"DATABASE_URL": url}, start_worker=False)
        try:
            yield h
        finally:
            h.stop()


def test_an_email_that_waited_past_its_lease_is_not_sent_again(
    scaled_time: None, herald: InProcessHerald
) -> None:
    from actors.tree import ActorTree

    sent: list[tuple[str, str]] = []
    lock = threading.Lock()
    busy_mailer = _Mailer("busy", sent, lock, slow=("yes",))
    busy = ActorTree(herald.settings, print, None, lambda: busy_mailer)
    other = ActorTree(herald.settings, print, None, lambda: _Mailer("other", sent, lock))
    users = (*SLOW_USERS, WAITING_USER)
    busy.start()
    try:
        for user in users:
            herald.put_user(user, email_batching_period_seconds=2 if user == WAITING_USER
                            else 1)
        # The busy worker takes every event; its one mail thread sends the slow emails
        # (each within a lease), and the last one waits behind them for longer.
        for user in users:
            busy.email(parse_event(message_event(user, message_id=9000 + user)), None)
        wait_until(lambda: busy_mailer.started, timeout=30, what="the first send")
        # The other worker comes up once the busy one has claimed every batch; its
        # sweep takes rows whose lease has run out.
        other.start()
        wait_until(lambda: len(sent) >= len(users), timeout=30, what="every user's email")
        time.sleep(SLOW_SEND + 1.0)  # time for a second copy to go out, were there one
        recipients = sorted(to for _, to in sent)
        assert recipients == sorted(f"user{u}@example.com" for u in users), sent
        # The waiting one's lease had run out: it went out once, from the worker that
        # took its rows.
        assert ("other", f"user{WAITING_USER}@example.com") in sent, sent
    finally:
        busy.stop(timeout=20)
        other.stop(timeout=20)
