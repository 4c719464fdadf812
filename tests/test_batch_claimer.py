"""The BatchClaimer: many users' flushes claimed and settled together, on both backends.

End to end, the email tests show each behaviour through the claimer; here a group is
formed on purpose (requests queued before its thread starts), so what a group must keep
apart (one user's read state, one user's claim) is checked directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import pykka
import pytest
from prometheus_client import REGISTRY

from actors import _batch_store as store
from actors._batch_claimer import ORPHAN_RETRY_SECONDS, BatchClaimer, Claimed, Settled
from events import parse_event
from models import DeadLetter, User, write_transaction
from models import ScheduledMessageNotificationEmail as Row
from tests.conftest import message_event
from tests.harness import (
    InProcessHerald,
    as_outage_role,
    database_outage,
    end_outage,
    wait_until,
)

SHARED, OWN = 7001, 7100  # one stream message to every user; then one message each
_POLICY = store.RetryPolicy(max_tries=3, delay_for=lambda tries: 1.0)


def _no_schedule(delay: float, fn: Any) -> None:
    raise AssertionError("nothing here is asked again")


class Inbox(pykka.ThreadingActor):
    """Stands in for a UserBatchActor: puts whatever it is told on a queue."""

    def __init__(self, received: queue.Queue[Any]) -> None:
        super().__init__()
        self.received = received

    def on_receive(self, message: Any) -> None:
        self.received.put(message)


def _record(h: InProcessHerald, users: list[int], due: float) -> None:
    def setup() -> None:
        User.insert_many([{"id": u, "email": f"user{u}@example.com", "full_name": f"U{u}"}
                          for u in users]).execute()
        events: list[Any] = []
        for u in users:
            events.append(parse_event(message_event(u, message_id=SHARED)))
            events.append(parse_event(message_event(u, message_id=OWN + u)))
        with write_transaction():
            store.record_many(events, now=due - 120)

    h.db(setup)


def _group_sizes() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("herald_email_claim_group_size_count") or 0.0
    total = REGISTRY.get_sample_value("herald_email_claim_group_size_sum") or 0.0
    return count, total


def test_a_group_claims_each_users_own_batch_and_hands_back_a_stopped_actors(
    idle_herald: InProcessHerald,
) -> None:
    users = [1, 2, 3, 4, 5]
    _record(idle_herald, users, due=time.time() - 1)
    # User 2 read the shared message, and user 3's own message was deleted, before
    # the flush: the group must drop those for them alone.
    idle_herald.db(lambda: store.drop_read(2, [SHARED]))
    idle_herald.db(lambda: store.drop_deleted([OWN + 3]))
    received: queue.Queue[Any] = queue.Queue()
    inbox = Inbox.start(received)
    gone = Inbox.start(received)
    gone.stop()
    claimer = BatchClaimer("test-worker", _POLICY, _no_schedule)
    count_before, sum_before = _group_sizes()
    try:
        for user in [1, 2, 3, 4]:
            claimer.claim(user, False, inbox)
        claimer.claim(5, False, gone)  # its actor stopped: the claim must be handed back
        claimer.start()
        answers = [received.get(timeout=10) for _ in range(4)]
        assert all(isinstance(a, Claimed) and a.batch is not None for a in answers)
        batches = {a.batch.user.id: a.batch for a in answers}
        assert {u: sorted(b.messages) for u, b in batches.items()} == {
            1: [SHARED, OWN + 1], 2: [OWN + 2], 3: [SHARED], 4: [SHARED, OWN + 4],
        }
        assert len({b.claim_id for b in batches.values()}) == 4
        # One group of five claims, one transaction.
        count_after, sum_after = _group_sizes()
        assert (count_after - count_before, sum_after - sum_before) == (1, 5)

        def claims() -> dict[tuple[int, int], str | None]:
            return {(r.user_id, r.message_id): r.claimed_by for r in Row.select()}

        # User 5's claim is handed back right after the answers to the others go out.
        claimed = wait_until(lambda: _if_handed_back(idle_herald.db(claims)), timeout=10,
                             what="the stopped actor's claim to be handed back")
        # Rows read or deleted meanwhile are gone; the others carry their user's claim.
        assert (2, SHARED) not in claimed and (3, OWN + 3) not in claimed
        assert claimed[(1, OWN + 1)] == batches[1].claim_id

        # Settle: user 1 sent everything; user 4 only its own message (the shared one
        # failed and stays claimed); the answers carry each user's next wake-up.
        claimer.settle(store.Settlement(batches[1].claim_id, 1, None), inbox)
        claimer.settle(store.Settlement(batches[4].claim_id, 4, [OWN + 4]), inbox)
        settled = [received.get(timeout=10) for _ in range(2)]
        assert all(isinstance(s, Settled) for s in settled)
        left = idle_herald.db(claims)
        assert not any(user == 1 for user, _ in left)
        assert (4, OWN + 4) not in left and left[(4, SHARED)] == batches[4].claim_id
        wakeups = sorted(s.wakeup is None for s in settled)
        assert wakeups == [False, True]  # user 4 looks again when its lease ends
    finally:
        claimer.stop()
        inbox.stop()


class _CommitLost(Exception):
    """The settle's transaction failing after its dead letter was written."""


def test_a_settle_asked_again_counts_and_logs_its_dead_letter_once(
    idle_herald: InProcessHerald, caplog: pytest.LogCaptureFixture,
) -> None:
    _record(idle_herald, [9], due=time.time() - 1)
    batches, _ = idle_herald.db(lambda: store.claim_batches([9], (), "group-1"))
    refused = store.Settlement(batches[9].claim_id, 9, [], [
        store.Unsent(sorted(batches[9].messages), "550 mailbox unavailable", transient=False),
    ])

    def counted() -> float:
        return REGISTRY.get_sample_value(
            "herald_dead_letters_total", {"kind": "email_batch"}) or 0.0

    def settle_then_fail() -> None:
        with write_transaction():
            store.settle([refused], [9], _POLICY)
            raise _CommitLost

    before = counted()
    with caplog.at_level(logging.WARNING, logger="herald.dead_letters"):
        with pytest.raises(_CommitLost):
            idle_herald.db(settle_then_fail)
        # Rolled back: no letter stored, so none counted or logged.
        assert idle_herald.db(lambda: DeadLetter.select().count()) == 0
        assert counted() == before and not _letters_logged(caplog)
        idle_herald.db(lambda: store.settle([refused], [9], _POLICY))  # asked again
    assert idle_herald.db(lambda: DeadLetter.select().count()) == 1
    assert idle_herald.db(lambda: Row.select().where(Row.user_id == 9).count()) == 0
    assert counted() == before + 1
    assert _letters_logged(caplog) == [f"dead letter {idle_herald.db(lambda: DeadLetter.get().id)}"]


@pytest.mark.parametrize("backend", ["production"])
def test_a_settle_the_database_refuses_fails_neither_its_group_nor_its_actor(
    idle_herald: InProcessHerald, caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal's reason holding a NUL, which PostgreSQL cannot store, fails the
    settles grouped with it: they are settled one by one, and that one is settled
    with the reason made storable, so no actor is told its settle failed (and
    crashes, leaving its sent rows to go out again when the lease ends)."""
    users = [1, 2, 3]
    _record(idle_herald, users, due=time.time() - 1)
    batches, _ = idle_herald.db(lambda: store.claim_batches(users, (), "group-1"))
    received: queue.Queue[Any] = queue.Queue()
    inbox = Inbox.start(received)
    claimer = BatchClaimer("test-worker", _POLICY, _no_schedule)
    try:
        claimer.settle(store.Settlement(batches[1].claim_id, 1, None), inbox)
        claimer.settle(store.Settlement(batches[2].claim_id, 2, [OWN + 2], [
            store.Unsent([SHARED], "SMTP 550 on DATA: rejected\x00content", transient=False),
        ]), inbox)
        claimer.settle(store.Settlement(batches[3].claim_id, 3, None), inbox)
        claimer.start()  # the three settles make one group
        answers = [received.get(timeout=10) for _ in users]
        assert all(isinstance(a, Settled) for a in answers), answers
        assert "settling 3 email claims together failed" in caplog.text
        assert idle_herald.db(lambda: Row.select().count()) == 0
        [letter] = idle_herald.db(lambda: list(DeadLetter.select()))
        assert (letter.kind, letter.user_id) == ("email_batch", 2)
        assert letter.reason == "SMTP 550 on DATA: rejected content"
        assert str(SHARED) in letter.payload and str(OWN + 2) not in letter.payload
    finally:
        claimer.stop()
        inbox.stop()


def test_a_settle_that_cannot_record_its_failures_still_deletes_its_sent_rows(
    idle_herald: InProcessHerald, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails in a settle, its actor is answered, and the rows whose email
    went out are deleted: the others wait out the lease, to be tried again."""
    from intake import dead_letters

    def refuse(**kwargs: Any) -> int:
        raise ValueError("cannot store this letter")

    monkeypatch.setattr(dead_letters, "record", refuse)
    _record(idle_herald, [4], due=time.time() - 1)
    batches, _ = idle_herald.db(lambda: store.claim_batches([4], (), "group-1"))
    received: queue.Queue[Any] = queue.Queue()
    inbox = Inbox.start(received)
    claimer = BatchClaimer("test-worker", _POLICY, _no_schedule)
    claimer.start()
    try:
        claimer.settle(store.Settlement(batches[4].claim_id, 4, [OWN + 4], [
            store.Unsent([SHARED], "SMTP 550 on DATA: rejected", transient=False),
        ]), inbox)
        answer = received.get(timeout=10)
        assert isinstance(answer, Settled)
        left = idle_herald.db(lambda: [(r.message_id, r.claimed_by, r.claimed_until)
                                 for r in Row.select()])
        assert [(m, c) for m, c, _ in left] == [(SHARED, batches[4].claim_id)]
        assert answer.wakeup == pytest.approx(left[0][2])  # when the lease ends
    finally:
        claimer.stop()
        inbox.stop()


def _letters_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records
            if r.name == "herald.dead_letters"]


def _if_handed_back(claimed: dict[tuple[int, int], str | None]) -> Any:
    """`claimed` once user 5's rows are claimed by nobody, else None."""
    if claimed[(5, SHARED)] is None and claimed[(5, OWN + 5)] is None:
        return claimed
    return None


def test_nothing_due_answers_with_the_next_wakeup(idle_herald: InProcessHerald) -> None:
    due = time.time() + 60
    _record(idle_herald, [1], due=due)
    received: queue.Queue[Any] = queue.Queue()
    inbox = Inbox.start(received)
    claimer = BatchClaimer("test-worker", _POLICY, _no_schedule)
    claimer.start()
    try:
        claimer.claim(1, False, inbox)
        answer = received.get(timeout=10)
        assert isinstance(answer, Claimed) and answer.batch is None
        assert answer.wakeup == pytest.approx(due, abs=0.01)
        # Forced ("flush": "now"): the same rows are due at once.
        claimer.claim(1, True, inbox)
        answer = received.get(timeout=10)
        assert isinstance(answer, Claimed) and answer.batch is not None
        assert sorted(answer.batch.messages) == [SHARED, OWN + 1]
    finally:
        claimer.stop()
        inbox.stop()


def test_a_worker_on_a_host_with_the_longest_name_linux_allows_still_claims(
    idle_herald: InProcessHerald,
) -> None:
    # A worker's id starts with its host name: 64 characters on Linux at most.
    worker_id = f"{'h' * 64}:4194304:abcdef"
    received: queue.Queue[Any] = queue.Queue()
    inbox = Inbox.start(received)
    claimer = BatchClaimer(worker_id, _POLICY, _no_schedule)
    claimer.start()
    try:
        user = 200_000_000_000
        _record(idle_herald, [user], due=time.time() - 1)
        claimer.claim(user, False, inbox)
        answer = received.get(timeout=10)
        assert isinstance(answer, Claimed) and answer.batch is not None
        assert answer.batch.claim_id.startswith(worker_id)
        assert sorted(answer.batch.messages) == [SHARED, OWN + user]
    finally:
        claimer.stop()
        inbox.stop()


@pytest.mark.parametrize("backend", ["production"])
def test_a_settle_whose_actor_is_gone_is_asked_again_when_the_database_was_away(
    env: dict[str, str],
) -> None:
    """A draining worker's email went out after its actor stopped, and its settle
    meets a database restart: the claimer asks again by itself until the database
    answers, so the sent rows do not wait out the lease to go out a second time."""
    h = InProcessHerald(as_outage_role(env), start_worker=False)
    received: queue.Queue[Any] = queue.Queue()
    inbox, gone = Inbox.start(received), Inbox.start(received)
    gone.stop()
    scheduled: list[float] = []

    def schedule(delay: float, fn: Any) -> None:
        scheduled.append(delay)
        threading.Timer(0.3, fn).start()  # sooner than asked: the test need not wait

    claimer = BatchClaimer("test-worker", _POLICY, schedule)
    claimer.start()
    try:
        _record(h, [1], due=time.time() - 1)
        claimer.claim(1, False, inbox)
        answer = received.get(timeout=10)
        assert isinstance(answer, Claimed) and answer.batch is not None
        assert database_outage(1.0) >= 1  # the claimer thread's session among them
        claimer.settle(store.Settlement(answer.batch.claim_id, 1, None), gone)
        wait_until(lambda: _rows_left(env) == 0, timeout=15,
                   what="the sent rows to be deleted")
        assert scheduled and set(scheduled) == {ORPHAN_RETRY_SECONDS}
    finally:
        end_outage()
        claimer.stop()
        inbox.stop()
        h.stop()


def _rows_left(env: dict[str, str]) -> int:
    """Pending email rows, read on a connection of the test's own."""
    import psycopg2

    from tests.harness import PG_ADMIN_URL

    schema = env["DATABASE_URL"].rpartition("?schema=")[2]
    conn = psycopg2.connect(PG_ADMIN_URL)
    try:
        cursor = conn.cursor()
        cursor.execute(f'SELECT count(*) FROM {schema}."{Row._meta.table_name}"')
        return int(cursor.fetchone()[0])
    finally:
        conn.close()
