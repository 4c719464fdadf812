"""Email batching end to end: the ingest API in, a real SMTP server (aiosmtpd) out.

Every test runs on both backends (SQLite + in-process broker, PostgreSQL + RabbitMQ).
Batching periods are one or two seconds so the windows close quickly; timing checks
are one-sided with generous margins (never "exactly at").
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import message_event
from tests.harness import InProcessHerald, free_port, wait_until

# How late after its deadline an email may arrive and still count as "about on time".
LATE_MARGIN = 3.0
# How long to keep watching for emails that must not come.
QUIET_SECONDS = 1.0

MARKER = re.compile(r"\bm(\d+)x\b")


# A real SMTP server -------------------------------------------------------------------


@dataclass
class Received:
    at: float
    message: EmailMessage
    rcpt: list[str]

    @property
    def subject(self) -> str:
        return self.header("Subject")

    def header(self, name: str) -> str:
        # A folded header keeps its continuation's leading space when parsed.
        return " ".join(str(self.message[name]).split())

    @property
    def to(self) -> str:
        return self.rcpt[0]

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None, f"no text/{subtype} part"
        return str(body.get_content())

    @property
    def message_ids(self) -> list[int]:
        """The test markers (`m<id>x`) found in the plain-text part."""
        return sorted(int(m) for m in MARKER.findall(self.part("plain")))


@dataclass
class SmtpInbox:
    """An aiosmtpd handler that records what it accepts, with per-recipient behaviour.

    For a recipient address: `replies[addr]` are answered to its next DATA commands in
    turn (e.g. "451 ..."), then `always[addr]` (if set) to every one; `delay[addr]`
    seconds pass before each answer. `attempts[addr]` counts its DATA commands.
    """

    port: int = 0
    received: list[Received] = field(default_factory=list)
    replies: dict[str, list[str]] = field(default_factory=dict)
    always: dict[str, str] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rcpt = envelope.rcpt_tos[0]
        with self.lock:
            self.attempts[rcpt] += 1
        if self.delay.get(rcpt):
            await asyncio.sleep(self.delay[rcpt])
        with self.lock:
            if self.replies.get(rcpt):
                return self.replies[rcpt].pop(0)
            if rcpt in self.always:
                return self.always[rcpt]
            parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self.received.append(Received(time.time(), parsed, list(envelope.rcpt_tos)))
        return "250 OK"

    def emails(self, to: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if to is None or r.to == to]

    def wait_for(self, count: int, to: str | None = None, timeout: float = 10.0) -> list[Received]:
        wait_until(lambda: len(self.emails(to)) >= count, timeout=timeout,
                   what=f"{count} email(s) to {to or 'anyone'}")
        return self.emails(to)


@pytest.fixture(name="smtp")
def smtp_server() -> Iterator[SmtpInbox]:
    inbox = SmtpInbox(port=free_port())
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()


@pytest.fixture
def start(env: dict[str, str], smtp: SmtpInbox) -> Iterator[Callable[..., InProcessHerald]]:
    """Starts an in-process herald sending through `smtp`; stops whatever it started."""
    started: list[InProcessHerald] = []

    def _start(**extra: str) -> InProcessHerald:
        h = InProcessHerald({**env, "SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
                             "SMTP_TIMEOUT_SECONDS": "15", **extra})
        started.append(h)
        return h

    try:
        yield _start
    finally:
        for h in reversed(started):
            if getattr(h, "_stopped", False):
                continue
            h.stop()


# Helpers ------------------------------------------------------------------------------


def addr(user_id: int) -> str:
    return f"user{user_id}@example.com"


def event(user_id: int, **kw: Any) -> dict[str, Any]:
    """A message event whose content carries a marker naming its message id."""
    e = message_event(user_id, channels=("email",), **kw)
    e["message"]["content_html"] = f"<p>hello m{e['message']['id']}x</p>"
    return e


def mid(e: dict[str, Any]) -> int:
    return int(e["message"]["id"])


def post(h: InProcessHerald, *events: dict[str, Any]) -> None:
    response = h.post_events(*events)
    assert response.status_code == 202, response.text


def pending(h: InProcessHerald, user_id: int) -> dict[int, float]:
    response = h.client.get(f"/v1/users/{user_id}/pending")
    assert response.status_code == 200, response.text
    return {p["message_id"]: p["scheduled_timestamp"] for p in response.json()["pending"]}


def wait_pending(h: InProcessHerald, user_id: int, ids: list[int],
                 timeout: float = 10.0) -> dict[int, float]:
    def check() -> dict[int, float] | None:
        rows = pending(h, user_id)
        return rows if set(ids) <= set(rows) else None

    return wait_until(check, timeout=timeout, what=f"pending rows {ids} for user {user_id}")  # type: ignore[no-any-return]


def dead_letters(h: InProcessHerald) -> list[Any]:
    import models

    return h.db(lambda: list(models.DeadLetter.select().order_by(models.DeadLetter.id)))  # type: ignore[no-any-return]


def by_subject(emails: list[Received]) -> dict[str, list[Received]]:
    out: dict[str, list[Received]] = {}
    for r in emails:
        out.setdefault(r.subject, []).append(r)
    return out


# 1. The window ------------------------------------------------------------------------


def test_first_message_opens_the_window_and_later_ones_join_it(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=2)
    first = event(7, topic="logo")
    before = time.time()
    post(h, first)
    deadline = wait_pending(h, 7, [mid(first)])[mid(first)]
    assert before + 2 <= deadline <= time.time() + 2

    time.sleep(0.6)
    same_topic, dm = event(7, topic="logo"), event(7, stream=None, sender="Bob", sender_id=4)
    post(h, same_topic, dm)
    rows = wait_pending(h, 7, [mid(same_topic), mid(dm)])
    assert set(rows.values()) == {deadline}, "later messages must join the open window"

    emails = smtp.wait_for(2, timeout=deadline - time.time() + LATE_MARGIN + 5)
    time.sleep(QUIET_SECONDS)
    emails = smtp.emails()
    subjects = by_subject(emails)
    assert sorted(subjects) == ["#design > logo", "DMs with Bob"]
    assert all(len(v) == 1 for v in subjects.values()), "one email per conversation"
    assert subjects["#design > logo"][0].message_ids == [mid(first), mid(same_topic)]
    assert subjects["DMs with Bob"][0].message_ids == [mid(dm)]
    for r in emails:
        assert r.to == addr(7)
        assert r.at >= deadline, f"sent {deadline - r.at:.2f}s before the deadline"
        assert r.at <= deadline + LATE_MARGIN, f"sent {r.at - deadline:.2f}s late"
    assert pending(h, 7) == {}


# 2. Changing the period ---------------------------------------------------------------


def test_changing_the_period_moves_the_open_window(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)  # will grow to 2
    h.put_user(8, email_batching_period_seconds=60)  # will shrink to 1
    a, b = event(7), event(8)
    post(h, a, b)
    deadline_a = wait_pending(h, 7, [mid(a)])[mid(a)]
    deadline_b = wait_pending(h, 8, [mid(b)])[mid(b)]

    h.put_user(7, email_batching_period_seconds=2)
    h.put_user(8, email_batching_period_seconds=1)
    moved_a, moved_b = pending(h, 7)[mid(a)], pending(h, 8)[mid(b)]
    assert moved_a == pytest.approx(deadline_a + 1, abs=0.05)
    assert moved_b == pytest.approx(deadline_b - 59, abs=0.05)

    [got_b] = smtp.wait_for(1, to=addr(8), timeout=moved_b - time.time() + LATE_MARGIN)
    assert moved_b <= got_b.at <= moved_b + LATE_MARGIN
    [got_a] = smtp.wait_for(1, to=addr(7), timeout=moved_a - time.time() + LATE_MARGIN)
    assert got_a.at >= moved_a, "the window grew: the email must wait for the new deadline"
    assert got_a.at <= moved_a + LATE_MARGIN
    time.sleep(QUIET_SECONDS)
    assert len(smtp.emails()) == 2


def test_a_retried_put_rearms_after_the_rearm_publish_failed(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dramatiq.errors import ConnectionClosed

    from intake.consumers import COMMAND_REARM_USER

    h = start()
    h.put_user(8, email_batching_period_seconds=60)  # will shrink to 2
    e = event(8)
    post(h, e)
    old_deadline = wait_pending(h, 8, [mid(e)])[mid(e)]

    rearms: list[Any] = []
    outages = [ConnectionClosed(OSError("broker went away"))]
    enqueue = h.broker.enqueue

    def flaky(message: Any, **kwargs: Any) -> Any:
        if message.kwargs.get("command") == COMMAND_REARM_USER:
            rearms.append(message.args[0])
            if outages:
                raise outages.pop()
        return enqueue(message, **kwargs)

    monkeypatch.setattr(h.broker, "enqueue", flaky)
    body = {"email": addr(8), "full_name": "User 8", "email_batching_period_seconds": 2}
    failed = h.client.put("/v1/users/8", json=body)
    assert failed.status_code == 503, failed.text
    moved = pending(h, 8)[mid(e)]
    assert moved == pytest.approx(old_deadline - 58, abs=0.05), "the change was committed"

    h.put_user(8, email_batching_period_seconds=2)  # the retry: nothing left to change
    assert rearms == [{"user_id": 8}, {"user_id": 8}], "the retry must re-arm the batch"
    [got] = smtp.wait_for(1, to=addr(8), timeout=moved - time.time() + LATE_MARGIN)
    assert moved <= got.at <= moved + LATE_MARGIN, "sent at the new, earlier deadline"


# 3. Read and deleted messages ---------------------------------------------------------


def test_read_and_deleted_messages_are_left_out(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    for uid in (7, 8, 9):
        h.put_user(uid, email_batching_period_seconds=2)
    kept, read, deleted = event(7), event(7), event(7)
    all_read, all_deleted = event(8), event(9)
    post(h, kept, read, deleted, all_read, all_deleted)
    wait_pending(h, 7, [mid(kept), mid(read), mid(deleted)])
    deadline = wait_pending(h, 8, [mid(all_read)])[mid(all_read)]
    wait_pending(h, 9, [mid(all_deleted)])

    post(h, {"type": "read", "user_id": 7, "message_ids": [mid(read)]},
         {"type": "read", "user_id": 8, "message_ids": [mid(all_read)]},
         {"type": "message_deleted", "message_ids": [mid(deleted), mid(all_deleted)]})
    wait_until(lambda: set(pending(h, 7)) == {mid(kept)} and not pending(h, 8)
               and not pending(h, 9), what="read/deleted rows to leave the batches")

    [got] = smtp.wait_for(1, timeout=deadline - time.time() + LATE_MARGIN)
    assert got.to == addr(7)
    assert got.message_ids == [mid(kept)]
    time.sleep(max(0.0, deadline + QUIET_SECONDS - time.time()))
    assert len(smtp.emails()) == 1, "an all-read or all-deleted batch sends nothing"


# 4. Conversations, 7. sanitised HTML -------------------------------------------------


def test_one_email_per_conversation_with_sanitised_html(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    upper, lower = event(7, topic="Logo"), event(7, topic="logo")
    ada, bob = (event(7, stream=None, sender="Ada", sender_id=3),
                event(7, stream=None, sender="Bob", sender_id=4))
    group = event(7, stream=None, sender="Cy", sender_id=5)
    group["message"]["pm_users"] = [{"id": 7, "full_name": "User 7"},
                                    {"id": 3, "full_name": "Ada"},
                                    {"id": 5, "full_name": "Cy"}]
    bob["message"]["content_html"] = (
        f'<p>look m{mid(bob)}x <script>alert("pwned")</script>'
        '<img src="https://example.com/a.png" onerror="alert(2)">'
        '<a href="javascript:alert(3)" onclick="alert(4)">link</a></p>'
    )
    post(h, upper, lower, ada, bob, group)
    smtp.wait_for(4, timeout=10)
    time.sleep(QUIET_SECONDS)
    subjects = by_subject(smtp.emails())
    assert sorted(subjects) == ["#design > Logo", "DMs with Ada", "DMs with Bob",
                                "Group DMs with Ada and Cy"]
    assert all(len(v) == 1 for v in subjects.values()), "one email per conversation"
    assert subjects["#design > Logo"][0].message_ids == sorted([mid(upper), mid(lower)])
    assert subjects["DMs with Ada"][0].message_ids == [mid(ada)]
    assert subjects["DMs with Bob"][0].message_ids == [mid(bob)]
    assert subjects["Group DMs with Ada and Cy"][0].message_ids == [mid(group)]
    for r in smtp.emails():
        assert r.message.get_content_type() == "multipart/alternative"
        assert r.header("List-Unsubscribe").startswith("<http")
        assert r.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"

    html = subjects["DMs with Bob"][0].part("html")
    assert f"look m{mid(bob)}x" in html
    assert "https://example.com/a.png" in html
    lowered = html.lower()
    for bad in ("<script", "alert(", "onerror", "onclick", "javascript:"):
        assert bad not in lowered, f"{bad!r} survived sanitising"


def test_stream_names_differing_in_case_make_one_email_without_a_stream_id(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    # Without an id, the name tells streams apart, compared as the subject line is.
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    upper, lower = event(7, stream="Design"), event(7, stream="design")
    for e in (upper, lower):
        del e["message"]["stream_id"]
    post(h, upper, lower)
    [got] = smtp.wait_for(1, timeout=10)
    time.sleep(QUIET_SECONDS)
    assert len(smtp.emails()) == 1, "one conversation, one email"
    assert got.subject == "#Design > logo"
    assert got.message_ids == sorted([mid(upper), mid(lower)])
    assert pending(h, 7) == {}


# 5. A message during a flush ----------------------------------------------------------


def test_a_message_arriving_during_a_flush_goes_to_the_next_window(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    smtp.delay[addr(7)] = 1.0
    first = event(7)
    post(h, first)
    deadline = wait_pending(h, 7, [mid(first)])[mid(first)]
    wait_until(lambda: smtp.attempts[addr(7)] >= 1, timeout=10,
               what="the first send to start")
    second = event(7)
    post(h, second)
    rows = wait_pending(h, 7, [mid(second)])
    assert rows[mid(second)] > deadline, "it must open a new window, not join the one in flight"

    smtp.wait_for(2, timeout=10)
    time.sleep(QUIET_SECONDS)
    emails = sorted(smtp.emails(), key=lambda r: r.at)
    assert [r.message_ids for r in emails] == [[mid(first)], [mid(second)]]
    assert pending(h, 7) == {}


# 6. SMTP failures ---------------------------------------------------------------------


def test_smtp_failures_retry_then_send_once_or_dead_letter(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start(RETRY_MAX_TRIES="3")
    for uid in (7, 8, 9):
        h.put_user(uid, email_batching_period_seconds=1)
    smtp.replies[addr(7)] = ["451 4.3.0 try again later"] * 2  # then accepted
    smtp.always[addr(8)] = "550 5.1.1 no such mailbox"  # permanent
    smtp.always[addr(9)] = "451 4.3.0 still busy"  # never gets through
    flaky, refused, busy = event(7), event(8), event(9)
    post(h, flaky, refused, busy)

    [got] = smtp.wait_for(1, to=addr(7), timeout=15)
    assert got.message_ids == [mid(flaky)]
    wait_until(lambda: len(dead_letters(h)) >= 2, timeout=15, what="two dead letters")
    time.sleep(QUIET_SECONDS)
    assert len(smtp.emails()) == 1, "only the retried email arrives, once"
    assert smtp.attempts == {addr(7): 3, addr(8): 1, addr(9): 3}

    letters = dead_letters(h)  # after the quiet period: a late duplicate would show
    assert len(letters) == 2
    by_user = {d.user_id: d for d in letters}
    assert sorted(by_user) == [8, 9]
    assert all(d.kind == "email_batch" for d in by_user.values())
    assert "550" in by_user[8].reason and "no such mailbox" in by_user[8].reason
    assert str(mid(refused)) in by_user[8].payload
    assert "451" in by_user[9].reason and "3 tries" in by_user[9].reason
    assert by_user[9].attempts == 3
    assert str(mid(busy)) in by_user[9].payload
    for uid in (7, 8, 9):
        assert pending(h, uid) == {}


def test_a_stored_message_that_cannot_be_read_is_dead_lettered_alone(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    import models

    h = start()
    for uid in (7, 8):
        h.put_user(uid, email_batching_period_seconds=2)
    unreadable, fine, other = event(7), event(7), event(8)
    post(h, unreadable, fine, other)
    wait_pending(h, 7, [mid(unreadable), mid(fine)])
    # As a snapshot from another version could look: not the message format at all.
    h.db(lambda: models.Message.update(data='{"id": 1, "from": "elsewhere"}')
         .where(models.Message.id == mid(unreadable)).execute())

    [to_7] = smtp.wait_for(1, to=addr(7), timeout=15)
    [to_8] = smtp.wait_for(1, to=addr(8), timeout=15)
    assert to_7.message_ids == [mid(fine)]
    assert to_8.message_ids == [mid(other)]
    wait_until(lambda: dead_letters(h), timeout=10, what="a dead letter")
    time.sleep(QUIET_SECONDS)
    [letter] = dead_letters(h)
    assert (letter.kind, letter.user_id) == ("email_batch", 7)
    assert f"message {mid(unreadable)}: stored snapshot cannot be read" in letter.reason
    assert str(mid(unreadable)) in letter.payload and str(mid(fine)) not in letter.payload
    assert pending(h, 7) == {} and pending(h, 8) == {}
    assert len(smtp.emails()) == 2


def actor_restarts(h: InProcessHerald) -> float:
    """`herald_actor_restarts_total{actor="UserBatchActor"}`, as /metrics shows it."""
    response = h.client.get("/metrics")
    assert response.status_code == 200, response.text
    found = re.search(r'^herald_actor_restarts_total\{actor="UserBatchActor"\} (\S+)$',
                      response.text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_refusal_whose_reply_holds_a_nul_is_dead_lettered_once(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL cannot store a NUL: kept in the dead letter's reason, it would fail
    the settle, and the rows, left claimed, would go out again each time the lease
    ended, never dead-lettered."""
    from actors import _batch_store

    lease = 2.0
    monkeypatch.setattr(_batch_store, "CLAIM_LEASE_SECONDS", lease)  # 300 s in production
    h = start()
    restarts_before = actor_restarts(h)
    for uid in (7, 8):
        h.put_user(uid, email_batching_period_seconds=1)
    smtp.always[addr(7)] = "550 5.7.1 rejected\x00content"
    refused, fine = event(7), event(8)
    post(h, refused, fine)

    [to_8] = smtp.wait_for(1, to=addr(8), timeout=15)
    assert to_8.message_ids == [mid(fine)]
    wait_until(lambda: dead_letters(h), timeout=15, what="a dead letter")
    time.sleep(2 * lease + QUIET_SECONDS)  # long enough for a claim left behind to lapse
    [letter] = dead_letters(h)
    assert (letter.kind, letter.user_id) == ("email_batch", 7)
    assert letter.reason == "SMTP 550 on DATA: 5.7.1 rejected content"
    assert str(mid(refused)) in letter.payload
    assert smtp.attempts == {addr(7): 1, addr(8): 1}
    assert pending(h, 7) == {} and pending(h, 8) == {}
    assert actor_restarts(h) == restarts_before


def test_a_conversation_that_cannot_be_rendered_is_dead_lettered_and_the_rest_goes_out(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from actors import batch

    secret = "the launch date is friday"
    real_render = batch.render_digest

    def render_digest(recipient: Any, items: list[Any], **kw: Any) -> Any:
        # A defect that only this message's content sets off; its text quotes the content.
        for item in items:
            if secret in item.message.content_html:
                raise RuntimeError(f"cannot lay out {item.message.content_html!r}")
        return real_render(recipient, items, **kw)

    monkeypatch.setattr(batch, "render_digest", render_digest)
    h = start()
    restarts_before = actor_restarts(h)
    for uid in (7, 8):
        h.put_user(uid, email_batching_period_seconds=1)
    broken, same_topic = event(7, topic="logo"), event(7, topic="logo")
    broken["message"]["content_html"] = f"<p>{secret} m{mid(broken)}x</p>"
    dm, other_user = event(7, stream=None, sender="Bob", sender_id=4), event(8)
    post(h, broken, same_topic, dm, other_user)

    [to_7] = smtp.wait_for(1, to=addr(7), timeout=15)
    [to_8] = smtp.wait_for(1, to=addr(8), timeout=15)
    assert (to_7.subject, to_7.message_ids) == ("DMs with Bob", [mid(dm)])
    assert to_8.message_ids == [mid(other_user)]
    wait_until(lambda: dead_letters(h), timeout=10, what="a dead letter")
    time.sleep(QUIET_SECONDS)
    # The conversation that failed goes to the dead letters whole, once, saying why
    # without the content; nothing stays claimed, and no actor crashed over it.
    [letter] = dead_letters(h)
    assert (letter.kind, letter.user_id) == ("email_batch", 7)
    assert letter.reason.startswith("rendering failed: RuntimeError in render_digest ")
    assert secret not in letter.reason and secret not in caplog.text
    assert "RuntimeError" in caplog.text
    assert str(mid(broken)) in letter.payload and str(mid(same_topic)) in letter.payload
    assert str(mid(dm)) not in letter.payload
    assert pending(h, 7) == {} and pending(h, 8) == {}
    assert len(smtp.emails()) == 2
    assert actor_restarts(h) == restarts_before


def test_an_address_or_realm_url_that_cannot_be_rendered_never_stalls_the_batch(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    import models

    h = start()
    restarts_before = actor_restarts(h)
    h.put_user(7, email_batching_period_seconds=1)
    h.put_user(8, realm_name="Acme", email_batching_period_seconds=1)
    # As rows stored before ingest checked them could hold: an address that cannot be
    # written in a header (herald does not use SMTPUTF8), and a realm URL that cannot
    # be parsed.
    h.db(lambda: models.User.update(email="jörg@example.de")
         .where(models.User.id == 7).execute())
    h.db(lambda: models.User.update(realm_url="http://[x")
         .where(models.User.id == 8).execute())
    stream_7, dm_7 = event(7), event(7, stream=None, sender="Bob", sender_id=4)
    to_8 = event(8)
    to_8["message"]["content_html"] = (
        f'<p>see m{mid(to_8)}x <a href="/user_uploads/f.pdf">the file</a></p>')
    post(h, stream_7, dm_7, to_8)

    [got] = smtp.wait_for(1, to=addr(8), timeout=15)
    assert got.message_ids == [mid(to_8)]
    assert "notifications turned on in Acme." in got.part("plain")
    assert "[x" not in got.part("plain") and "[x" not in got.part("html")
    wait_until(lambda: len(dead_letters(h)) >= 2, timeout=10, what="two dead letters")
    time.sleep(QUIET_SECONDS)
    letters = dead_letters(h)
    assert len(letters) == 2, "one per conversation"
    assert {d.user_id for d in letters} == {7}
    for letter in letters:
        assert letter.kind == "email_batch"
        # The library call that failed, and the place in herald's rendering that made it.
        assert re.fullmatch(r"rendering failed: UnicodeEncodeError in formataddr "
                            r"\(email/utils\.py:\d+\), from render_digest "
                            r"\(rendering/email\.py:\d+\)", letter.reason), letter.reason
    assert sorted(str(mid(e)) in d.payload for d in letters for e in (stream_7, dm_7)) == [
        False, False, True, True]
    assert pending(h, 7) == {} and pending(h, 8) == {}
    assert [r.to for r in smtp.emails()] == [addr(8)]
    assert actor_restarts(h) == restarts_before


def test_a_message_nested_too_deep_for_a_recursive_walk_still_makes_its_email(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    deep = event(7)
    deep["message"]["content_html"] = (
        f"<p>Heads up m{mid(deep)}x</p>" + "<b>" * 3000 + "deep"
    )
    post(h, deep)
    [sent] = smtp.wait_for(1, to=addr(7), timeout=15)
    assert sent.message_ids == [mid(deep)]
    assert f"Heads up m{mid(deep)}x" in sent.part("plain")
    assert pending(h, 7) == {}


# 8. Flush now -------------------------------------------------------------------------


def test_flush_now_sends_the_open_batch_at_once(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=600)
    h.put_user(8, email_batching_period_seconds=600)
    waiting = event(7)
    post(h, waiting)
    wait_pending(h, 7, [mid(waiting)])
    urgent = event(7, flush="now")
    sent_at = time.time()
    post(h, urgent)
    [got] = smtp.wait_for(1, to=addr(7), timeout=10)
    assert got.message_ids == sorted([mid(waiting), mid(urgent)])
    assert got.at - sent_at < LATE_MARGIN + 2, "not waiting out the 600 s window"
    assert pending(h, 7) == {}

    # A second "flush now" while the first one's email is still being sent.
    smtp.delay[addr(8)] = 1.0
    one = event(8, flush="now")
    post(h, one)
    wait_until(lambda: smtp.attempts[addr(8)] >= 1, timeout=10, what="the first send")
    two = event(8, flush="now")
    post(h, two)
    emails = smtp.wait_for(2, to=addr(8), timeout=12)
    assert sorted(r.message_ids for r in emails) == [[mid(one)], [mid(two)]]
    assert pending(h, 8) == {}


# 9. Email off, unsubscribe ------------------------------------------------------------


def test_email_off_and_one_click_unsubscribe(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    h.put_user(8, email_batching_period_seconds=1, enable_offline_email_notifications=False)
    h.put_user(9, email_batching_period_seconds=2)
    post(h, event(7), event(8), later_off := event(9))
    deadline = wait_pending(h, 9, [mid(later_off)])[mid(later_off)]
    # Turned off while the batch waits: the batch is dropped at its deadline.
    h.put_user(9, email_batching_period_seconds=2, enable_offline_email_notifications=False)

    [got] = smtp.wait_for(1, to=addr(7), timeout=10)
    link = got.header("List-Unsubscribe").strip("<>")
    path = urlsplit(link).path
    assert path.startswith("/v1/unsubscribe/")
    assert link in got.part("plain")
    response = h.client.post(path, content=b"List-Unsubscribe=One-Click",
                             headers={"Authorization": "",
                                      "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert h.client.get("/v1/users/7").json()["enable_offline_email_notifications"] is False

    post(h, event(7))
    wait_until(lambda: not pending(h, 9), timeout=deadline - time.time() + LATE_MARGIN,
               what="the batch of a user who turned email off to be dropped")
    time.sleep(1 + QUIET_SECONDS)
    assert [r.to for r in smtp.emails()] == [addr(7)], "nothing for users with email off"
    for uid in (7, 8, 9):
        assert pending(h, uid) == {}


# 10. An actor retiring as messages arrive ---------------------------------------------


def test_actors_retiring_while_messages_arrive_lose_nothing(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    h = start()
    h.put_user(7, email_batching_period_seconds=1)
    unread: list[int] = []
    was_read: list[int] = []
    for i in range(40):
        # Every message flushes at once, and a third are read straight away, so the
        # user's actor keeps emptying its batch and retiring while more arrive.
        e = event(7, flush="now", topic=f"t{i % 3}")
        post(h, e)
        if i % 3 == 0:
            post(h, {"type": "read", "user_id": 7, "message_ids": [mid(e)]})
            was_read.append(mid(e))
        else:
            unread.append(mid(e))
        time.sleep(0.02)

    def delivered() -> list[int]:
        return [m for r in smtp.emails() for m in r.message_ids]

    wait_until(lambda: set(unread) <= set(delivered()), timeout=20,
               what="every unread message to be emailed")
    wait_until(lambda: not pending(h, 7), timeout=10, what="the batch to empty")
    time.sleep(QUIET_SECONDS)
    seen = delivered()
    assert len(seen) == len(set(seen)), "a message was emailed twice"
    assert set(seen) - set(unread) <= set(was_read)


# 11. Restart --------------------------------------------------------------------------


def test_restart_rearms_pending_batches(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    first = start()
    first.put_user(7, email_batching_period_seconds=2)
    e = event(7)
    post(first, e)
    deadline = wait_pending(first, 7, [mid(e)])[mid(e)]
    first.stop()
    first._stopped = True  # type: ignore[attr-defined]
    assert smtp.emails() == [], "stopped before the deadline: nothing sent yet"
    time.sleep(max(0.0, deadline + 0.5 - time.time()))

    restarted_at = time.time()
    second = start()
    [got] = smtp.wait_for(1, timeout=10)
    assert got.message_ids == [mid(e)]
    assert got.at - restarted_at < LATE_MARGIN + 2, "a passed deadline fires at once"
    time.sleep(QUIET_SECONDS)
    assert len(smtp.emails()) == 1
    assert pending(second, 7) == {}


def test_stopping_during_a_send_finishes_that_batch(
    start: Callable[..., InProcessHerald], smtp: SmtpInbox
) -> None:
    first = start()
    first.put_user(7, email_batching_period_seconds=1)
    smtp.delay[addr(7)] = 1.0
    e = event(7)
    post(first, e)
    wait_until(lambda: smtp.attempts[addr(7)] >= 1, timeout=10, what="the send to start")
    first.stop()  # drains: the email in flight is sent, and its rows must be let go
    first._stopped = True  # type: ignore[attr-defined]
    [got] = smtp.wait_for(1, timeout=5)
    assert got.message_ids == [mid(e)]

    second = start()
    assert pending(second, 7) == {}, "the sent batch is still pending: it would go out again"
    time.sleep(QUIET_SECONDS)
    assert len(smtp.emails()) == 1
