"""Group claims for the email side: many UserBatchActors' flushes, one transaction.

A flush needs the database twice: to claim the user's due rows (and load what
rendering needs), and, once the emails are out, to settle the claim (delete the sent
rows, hand back or dead-letter the failed ones) and find the next wake-up. Done one
user at a time, those round trips and commits cost more than rendering the email. So a
UserBatchActor does not query itself: it asks the `BatchClaimer`, and one claimer
thread per process takes every request queued so far (up to `GROUP_MAX`) and serves
them together: the settles in one transaction, the claims in another, each a few
set-based statements whatever the group's size (`_batch_store.claim_batches`,
`_batch_store.settle`).

Answers go back as messages (`Claimed`, `Settled`), so an actor never holds a pool
thread while it waits. When a batch is claimed for an actor that has stopped or
crashed meanwhile, or told to one that stops before it takes it (`abandon`), the
claimer hands the rows straight back (`release`), so they do not wait out the
claim's lease. When a group fails because the database was out of reach, each of its
actors gets `ClaimFailed` and hands its request back (`again`) after a backoff. A
group of claims that fails otherwise fails its actors, which crash, and their
supervisor restarts them, which re-reads their state from the database. A group of
settles that fails otherwise is settled again one by one, and a settle that fails on
its own is settled without what the database refused (`_settle_alone_failed`): its
emails are out, and an actor restarted over it would send them again. A settle whose
actor has stopped meanwhile (a draining worker) is asked again by the claimer itself,
and a claim whose emails never started (the worker stopped first) is handed back
(`release`).

Requests are grouped by `GroupThread`, as intake's are by `EmailRecorder`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka

from actors import _batch_store as store
from actors._group_thread import GroupThread
from metrics import EMAIL_CLAIM_GROUP_SIZE
from models import DATABASE_UNAVAILABLE, in_thread_connection

logger = logging.getLogger("herald.email")

# The most requests one group takes; bounds its locks and its statement sizes.
GROUP_MAX = 500
# How long the claimer waits before asking again a settle whose actor is gone (seconds).
ORPHAN_RETRY_SECONDS = 5.0
# How long a stopping claimer keeps asking again the settles the database refused
# (seconds): a worker draining during a database restart should not leave sent rows
# to go out again after their lease. Inside `GroupThread`'s wait for the thread.
STOP_PATIENCE_SECONDS = 20.0
# The longest pause between those tries (seconds).
STOP_RETRY_MAX_SECONDS = 2.0

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


# Answers (to the asking UserBatchActor) ----------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """The answer to `claim`: the claimed batch, or None and the next wake-up when
    nothing was due (already claimed by another worker, or sent, read or deleted)."""

    batch: store.Batch | None
    wakeup: float | None


@dataclass(frozen=True)
class Settled:
    """The answer to `settle`: the sent rows are gone; look again at `wakeup`."""

    wakeup: float | None


@dataclass(frozen=True)
class ClaimFailed:
    """The group holding this request failed (see the module's docstring)."""

    exc_info: ExcInfo


# Requests ----------------------------------------------------------------------------


class _Claim:
    """A flush's claim, from its request until its actor has taken the answer.

    Parameters:
      user_id: whose rows.
      forced: claim every pending row, not only the due ones.
      reply_to: the UserBatchActor told `Claimed`.

    Pykka drops what is left in a stopped actor's inbox, so a `Claimed` told to an
    actor whose stop came first would leave its rows claimed until the lease ends.
    The actor abandons its claim as it stops or crashes; a claim answered after that,
    or told and not taken by then, is handed back. A lock orders the claimer's
    thread (`answer`) and the actor's (`taken`, `abandon`).
    """

    def __init__(self, user_id: int, forced: bool, reply_to: pykka.ActorRef[Any]) -> None:
        self.user_id = user_id
        self.forced = forced
        self.reply_to = reply_to
        self._lock = threading.Lock()
        self._abandoned = False
        # The claim told to the actor and not taken by it yet.
        self._told: str | None = None

    def answer(self, message: Claimed) -> bool:
        """Tell the actor (claimer's thread); False if it is gone or has abandoned
        the claim, and the batch, if any, is to be handed back."""
        with self._lock:
            if self._abandoned or not _tell(self.reply_to, message):
                return False
            self._told = message.batch.claim_id if message.batch is not None else None
            return True

    def taken(self) -> None:
        """The actor handles the answer (its thread): the claim is its own now."""
        with self._lock:
            self._told = None

    def abandon(self) -> str | None:
        """The actor stops or crashes (its thread); the claim it was told and will not
        take, if any."""
        with self._lock:
            self._abandoned = True
            told, self._told = self._told, None
        return told


@dataclass(frozen=True)
class _Settle:
    settlement: store.Settlement
    # None once its actor has handed it over (`hand_over`).
    reply_to: pykka.ActorRef[Any] | None


@dataclass(frozen=True)
class _Release:
    claim_id: str


# A claim or a settle, as `claim` and `settle` return it.
Request = _Claim | _Settle
# Everything the claimer's thread serves.
_Work = _Claim | _Settle | _Release


class BatchClaimer(GroupThread[_Work]):
    """Serves flush claims and settles for many users at once, on one thread.

    Parameters:
      worker_id: this process's name; its claim ids start with it.
      policy: how often, and how far apart, a batch's email is tried.
      schedule: `schedule(delay, fn)` runs `fn` after `delay` seconds (on any thread);
        the claimer asks again through it a settle whose actor is gone.
    """

    def __init__(self, worker_id: str, policy: store.RetryPolicy,
                 schedule: Callable[[float, Callable[[], None]], Any]) -> None:
        super().__init__("herald-batch-claimer", GROUP_MAX)
        self._worker_id = worker_id
        self._policy = policy
        self._schedule = schedule
        self._groups = itertools.count(1)
        # Set by `stop`: until then, settles the database refused are asked again.
        self._stop_deadline: float | None = None
        self._stop_pause = 0.1
        # Settles of stopped actors waiting for their timer to be asked again, by id.
        self._waiting: dict[int, _Settle] = {}
        self._waiting_lock = threading.Lock()

    def claim(self, user_id: int, forced: bool, reply_to: pykka.ActorRef[Any]) -> Request:
        """Claim the user's due rows (all pending rows when `forced`); `reply_to` is
        told `Claimed` (any thread). Returns the request, for `again`."""
        request = _Claim(user_id, forced, reply_to)
        self.put(request)
        return request

    def settle(self, settlement: store.Settlement,
               reply_to: pykka.ActorRef[Any] | None) -> Request:
        """Record how the claim's flush ended (`_batch_store.settle`); `reply_to` is
        told `Settled` with the user's next wake-up (any thread), or, if it has
        stopped or is None (its actor let go of the flush), the claimer sees the
        settle through itself. Returns the request, for `again`."""
        request = _Settle(settlement, reply_to)
        self.put(request)
        return request

    def release(self, claim_id: str) -> None:
        """Hand the claim's rows back, pending again: its flush will not send them
        (any thread). If the database refuses, they wait out the lease."""
        self.put(_Release(claim_id))

    def taken(self, request: Request) -> None:
        """The actor that made `request` (a claim) handles its `Claimed` (its thread)."""
        if isinstance(request, _Claim):
            request.taken()

    def abandon(self, request: Request) -> None:
        """The actor that made `request` stops or crashes (its thread): a claim it
        has been told and will not take is handed back, and one answered later is
        handed back at once."""
        if isinstance(request, _Claim):
            claim_id = request.abandon()
            if claim_id is not None:
                self.release(claim_id)

    def again(self, request: Request) -> None:
        """Serve a request that failed once more (any thread)."""
        self.put(request)

    def hand_over(self, request: Request) -> None:
        """Take on a failed request whose actor is stopping (any thread): a settle is
        served once more, and asked again by the claimer while the database is away
        (its emails are out); a claim is dropped (its rows stay pending)."""
        if isinstance(request, _Settle):
            # The actor may still take messages while it stops; its answer would be lost.
            self.put(dataclasses.replace(request, reply_to=None))

    def stop(self) -> None:
        """Serve what is queued, asking again for a while the settles the database
        refuses (their emails are out), then end the thread (called once, at
        shutdown, after the actors and the mail threads have stopped)."""
        with self._waiting_lock:
            self._stop_deadline = time.monotonic() + STOP_PATIENCE_SECONDS
            waiting, self._waiting = self._waiting, {}
        for request in waiting.values():
            self.put(request)  # their timers will not fire once the worker stops
        super().stop()

    # The claimer thread -----------------------------------------------------------------

    def serve(self, group: list[_Work]) -> list[_Work]:
        settles = [r for r in group if isinstance(r, _Settle)]
        releases = [r.claim_id for r in group if isinstance(r, _Release)]
        claims: dict[int, _Claim] = {}
        later: list[_Work] = []
        for request in group:
            if isinstance(request, _Claim):
                if request.user_id in claims:
                    later.append(request)  # one claim per user per group
                else:
                    claims[request.user_id] = request
        if settles:
            later.extend(self._settle(settles))
        if releases:
            self._release(releases)
        if claims:
            self._claim(list(claims.values()))
        return later

    def _settle(self, requests: list[_Settle]) -> list[_Settle]:
        """Serve settles; returns those to serve again at once (the claimer is
        stopping and the database refused them)."""
        try:
            wakeups = in_thread_connection(
                store.settle, [r.settlement for r in requests],
                sorted({r.settlement.user_id for r in requests}), self._policy,
            )
        except DATABASE_UNAVAILABLE:
            logger.exception("settling %d email claims failed", len(requests))
            return self._unavailable(requests)
        except Exception as error:
            if len(requests) == 1:
                return self._settle_alone_failed(requests[0], error)
            # One settle's failure must not fail its neighbours, whose emails are out
            # as well: settle them one by one.
            logger.warning("settling %d email claims together failed; settling them one "
                           "by one", len(requests), exc_info=True)
            return [again for request in requests for again in self._settle([request])]
        for request in requests:
            _tell(request.reply_to, Settled(wakeups.get(request.settlement.user_id)))
        return []

    def _unavailable(self, requests: list[_Settle]) -> list[_Settle]:
        """The database was out of reach (inside an `except`): each actor asks again
        after a backoff, and the claimer for those whose actor is gone."""
        orphans = _fail(requests)
        # Their emails are out: the rows must not wait out the lease to go out again,
        # and no actor is left to ask again for them.
        return self._ask_again([o for o in orphans if isinstance(o, _Settle)])

    def _settle_alone_failed(self, request: _Settle, error: Exception) -> list[_Settle]:
        """A settle failed on its own while the database answered, so as it is it
        would fail every time. Its actor must not crash over it: the rows would stay
        claimed, go out again when the lease ends and fail to settle again, each
        round spending the supervisors' restart budget.

        What the database refuses is nearly always a failure's reason (an SMTP
        server's text, with a NUL that PostgreSQL cannot store). So the settle is
        recorded again with every reason made storable: the refused email becomes a
        dead letter, as a conversation that cannot be rendered does. Failing that,
        only its sent rows are deleted, so they never go out twice, and the others
        wait out the lease to be tried again; failing that too, the whole claim does.
        Either way the actor is answered as settled."""
        settlement = request.settlement
        user_id = settlement.user_id
        logger.error("settling email claim %s of user %s failed (%s); settling it without "
                     "what the database refused", settlement.claim_id, user_id,
                     type(error).__name__, exc_info=error)
        fallbacks: list[store.Settlement] = []
        if any(_storable(unsent.reason) != unsent.reason for unsent in settlement.unsent):
            fallbacks.append(dataclasses.replace(settlement, unsent=[
                dataclasses.replace(unsent, reason=_storable(unsent.reason))
                for unsent in settlement.unsent
            ]))
        only_sent = store.Settlement(settlement.claim_id, user_id, settlement.sent)
        if settlement.unsent and settlement.sent:
            fallbacks.append(only_sent)
        for fallback in fallbacks:
            try:
                wakeups = in_thread_connection(store.settle, [fallback], [user_id],
                                               self._policy)
            except DATABASE_UNAVAILABLE:
                logger.exception("settling email claim %s of user %s failed",
                                 settlement.claim_id, user_id)
                return self._unavailable([request])
            except Exception:
                logger.exception("settling email claim %s of user %s failed again",
                                 settlement.claim_id, user_id)
                continue
            if fallback is only_sent:
                logger.error("email claim %s of user %s: its unsent rows stay claimed until "
                             "the lease ends (%.0fs after the claim), then are tried again",
                             settlement.claim_id, user_id, store.CLAIM_LEASE_SECONDS)
            _tell(request.reply_to, Settled(wakeups.get(user_id)))
            return []
        logger.error("email claim %s of user %s could not be settled: its rows stay claimed "
                     "until the lease ends (%.0fs after the claim), then go out again",
                     settlement.claim_id, user_id, store.CLAIM_LEASE_SECONDS)
        _tell(request.reply_to, Settled(None))
        return []

    def _release(self, claim_ids: list[str]) -> None:
        try:
            in_thread_connection(store.release, claim_ids)
        except Exception:
            logger.exception("could not hand back %d email claims; their rows wait out "
                             "the lease", len(claim_ids))

    def _ask_again(self, orphans: list[_Settle]) -> list[_Settle]:
        with self._waiting_lock:  # `stop` either sees them waiting or is seen here
            deadline = self._stop_deadline
            if deadline is None:
                self._waiting.update((id(orphan), orphan) for orphan in orphans)
        if deadline is None:
            for orphan in orphans:
                self._schedule(ORPHAN_RETRY_SECONDS, functools.partial(self._wake, orphan))
            return []
        # Stopping: no timer will fire any more, so wait here, as long as the stop
        # allows.
        if not orphans or time.monotonic() + self._stop_pause > deadline:
            return []
        time.sleep(self._stop_pause)
        self._stop_pause = min(STOP_RETRY_MAX_SECONDS, self._stop_pause * 2)
        return orphans

    def _wake(self, request: _Settle) -> None:
        """A waiting settle's timer fired (timer thread): ask again, unless `stop`
        has already."""
        with self._waiting_lock:
            if self._waiting.pop(id(request), None) is None:
                return
        self.put(request)

    def _claim(self, requests: list[_Claim]) -> None:
        group_id = f"{self._worker_id}:{next(self._groups):x}"
        EMAIL_CLAIM_GROUP_SIZE.observe(len(requests))
        try:
            batches, wakeups = in_thread_connection(
                store.claim_batches, [r.user_id for r in requests],
                {r.user_id for r in requests if r.forced}, group_id,
            )
        except Exception:
            logger.exception("claiming %d users' email batches failed", len(requests))
            _fail(requests)
            return
        for request in requests:
            batch = batches.get(request.user_id)
            if request.answer(Claimed(batch, wakeups.get(request.user_id))):
                continue
            if batch is not None:
                # Its actor is gone: hand the rows back rather than let them wait out
                # the lease; the user's next actor (or the router's sweep) takes them.
                self._release([batch.claim_id])


def _tell(ref: pykka.ActorRef[Any] | None, message: Any) -> bool:
    if ref is None:
        return False
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


# Control characters (C0 and DEL), each read as a space: PostgreSQL's text cannot hold
# a NUL, and the others garble the logs and listings a reason is shown in.
_CONTROL_AS_SPACE = dict.fromkeys([*range(0x20), 0x7F], " ")


def _storable(reason: str) -> str:
    """`reason` as text any database stores: no control characters, and no lone
    surrogate (which cannot be encoded), each replaced."""
    text = " ".join(reason.translate(_CONTROL_AS_SPACE).split())
    return text.encode("utf-8", "replace").decode("utf-8")


def _fail(requests: Sequence[Request]) -> list[Request]:
    """Tell each request's actor its group failed; return those whose actor is gone."""
    exc_info = sys.exc_info()
    return [request for request in requests
            if not _tell(request.reply_to, ClaimFailed(exc_info))]  # type: ignore[arg-type]
