"""Email batching: BatchRouter and one UserBatchActor per user with pending email.

New rows are committed in groups by the `EmailRecorder` (one writer thread, so
"join the open window or open a new one" has no race inside a process, and the user
row lock in `_batch_store.record_many` covers other processes); it then tells the
BatchRouter whose timers to arm. Everything else about one user's batch happens in
that user's UserBatchActor. The actor's timer fires at the deadline (a shared
`TimerWheel`, not a poll); at flush it has the `BatchClaimer` claim the due rows
(together with every other user's flush of the moment), renders, hands the emails to
the `MailDispatcher`, and has the claimer delete the rows once they are sent. The
emails travel with a `_Delivery`, which brings what they came to back to the actor,
or to the claimer once the actor has stopped (a draining worker), so a sent email's
rows are deleted rather than sent again when their claim's lease ends.

UserBatchActors are `PooledActor`s: 100,000 of them share a few threads. The
BatchRouter (its own thread) creates them on demand, supervises them, and retires
them when their batch is empty, using a count of messages routed versus handled so
an actor is never stopped while a message is on its way to it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import pykka
from dramatiq.common import compute_backoff

from actors import _batch_store as store
from actors._batch_claimer import BatchClaimer, Claimed, ClaimFailed, Settled
from actors._batch_claimer import Request as ClaimerRequest
from actors._email_recorder import Recorded
from actors._mail import MailDispatcher, SendOutcome
from actors.runtime import PooledActor, TimerHandle, TimerWheel
from actors.supervision import ChildFailed, RestartChild, SupervisedMixin, SupervisorMixin
from metrics import EMAIL_SEND_LATENESS, EMAILS_SENT, PENDING_EMAIL_USERS
from models import DATABASE_UNAVAILABLE, in_thread_connection
from rendering.email import DigestItem, conversation_key, render_digest
from rendering.push import Recipient
from rendering.unsubscribe import unsubscribe_url
from settings import Settings

logger = logging.getLogger("herald.email")

# How often the router looks for pending users it has no actor for (seconds): rows
# written by a worker that died, or whose lease ran out.
SWEEP_INTERVAL_SECONDS = 60.0
# The longest wait before a flush tries its failed database call again (seconds).
DB_RETRY_MAX_SECONDS = 30.0
# Path components kept when a rendering failure names its file (``rendering/text.py``).
RENDER_FAILURE_PATH_PARTS = 2
# Where the rendering code lives, to tell its stack frames from the libraries' ones.
_RENDERING_DIR = PurePath(render_digest.__code__.co_filename).parent
# Innermost stack frames logged for a rendering failure; enough to find the fault,
# while a deep recursion still logs a few lines rather than a thousand.
RENDER_FAILURE_STACK_FRAMES = 20
# How long a stopping BatchRouter waits for its UserBatchActors to stop (seconds). They
# only let go of their flushes, so this is the actor pool's backlog; the root waits 60 s
# for both routers together, and the ShardRouter up to 30 s per push shard.
CHILDREN_STOP_SECONDS = 10.0


# Messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rearm:
    """Set the timer: at `deadline` when the sender read it already (the start-up scan
    reads every user's deadline in one query), else from the database."""

    deadline: float | None = None


@dataclass(frozen=True)
class FlushNow:
    """Send the open batch now (`"flush": "now"`)."""


@dataclass(frozen=True)
class _Fire:
    token: int


@dataclass(frozen=True)
class _Retry:
    """Hand the claimer the request of the flush in flight again."""

    request: ClaimerRequest


@dataclass(frozen=True)
class _Sent:
    """From the flush's `_Delivery`: what its emails came to is there to take."""

    delivery: _Delivery


@dataclass(frozen=True)
class Route:
    """To the BatchRouter: deliver `message` to `user_id`'s actor, creating it if needed.

    With `ask`, the answer is the child's own future for the message.
    """

    user_id: int
    message: Any


@dataclass(frozen=True)
class _Retire:
    user_id: int
    actor_urn: str
    handled: int


@dataclass(frozen=True)
class _Sweep:
    pass


@dataclass(frozen=True)
class PendingCount:
    """Ask the BatchRouter how many users have an open batch in this process."""


@dataclass(frozen=True)
class ChildUrns:
    """Ask the BatchRouter for {user_id: actor urn} of its live UserBatchActors."""


# Shared context ---------------------------------------------------------------------


@dataclass
class BatchContext:
    """What every UserBatchActor of a process shares.

    Parameters:
      settings: batching, retry and email settings.
      timers: the shared timer wheel.
      mail: the mail dispatcher.
      claimer: claims and settles batches for many users at once.
    """

    settings: Settings
    timers: TimerWheel
    mail: MailDispatcher
    claimer: BatchClaimer


# A flush's emails on their way ----------------------------------------------------------


class _Delivery:
    """One flush's emails with the `MailDispatcher` (`actors._mail.Delivery`), and the
    way back of what they came to.

    Parameters:
      claim_id: the flush's claim.
      user_id: whose emails.
      deadline: when the flush was due (for the lateness metric).
      unrendered: the outcomes of the conversations that could not be rendered.
      actor: the UserBatchActor that flushed; told `_Sent`.
      claimer: settles, or hands back, the claim once the actor has let go.

    The outcomes go to the actor as `_Sent`, and it has them settled. An actor that
    stops (a draining worker stops them all at once) or crashes lets go of its delivery
    first (`let_go`, on the actor's thread): Pykka drops what is left in a stopped
    actor's inbox, so outcomes told but not handled yet, and outcomes that come later,
    are settled by the claimer without the actor. A lock orders the mail thread's
    `sent` and the actor's `let_go`, so the claim is settled once whichever comes first,
    and a sent email's rows do not stay claimed, to go out again when the lease ends.
    `not_sent` and `still_sending` run on the thread that stops the dispatcher.
    """

    def __init__(self, claim_id: str, user_id: int, deadline: float,
                 unrendered: list[SendOutcome], actor: pykka.ActorRef[Any],
                 claimer: BatchClaimer) -> None:
        self.claim_id = claim_id
        self.user_id = user_id
        self.deadline = deadline
        self._unrendered = unrendered
        self._actor = actor
        self._claimer = claimer
        # About when the rows were claimed: the delivery is made right after the claim.
        self._claimed_at = time.monotonic()
        self._lock = threading.Lock()
        # Told to the actor and not taken by it yet.
        self._outcomes: list[SendOutcome] | None = None
        # Set once the actor has let go: whatever comes is settled here.
        self._let_go = False

    def sent(self, outcomes: list[SendOutcome]) -> None:
        """Every email was tried (mail thread)."""
        outcomes = self._unrendered + outcomes
        with self._lock:
            if not self._let_go:
                self._outcomes = outcomes
                try:
                    self._actor.tell(_Sent(self))
                    return
                except pykka.ActorDeadError:
                    # A crashing actor is dead before it lets go: nobody else settles.
                    self._outcomes = None
                    self._let_go = True
        self._settle(outcomes)

    def hold(self, message_ids: list[int]) -> bool:
        """Whether these rows are still this flush's to send (mail thread). An email
        that waited on a busy dispatcher for half the claim's lease renews it first:
        once the lease runs out, another worker may take the rows and send them."""
        if time.monotonic() - self._claimed_at < store.CLAIM_LEASE_SECONDS / 2:
            return True
        try:
            return in_thread_connection(store.renew_claim, self.claim_id, message_ids)
        except DATABASE_UNAVAILABLE as exc:
            # Nor can another worker take the rows while the database is away from it.
            logger.warning("email for user %s: could not renew its claim (%s); sending",
                           self.user_id, type(exc).__name__)
            return True

    def not_sent(self) -> None:
        """The worker stopped before the first email went: hand the rows back for
        the next worker, as a claim answered after its actor stopped is."""
        self._claimer.release(self.claim_id)

    def still_sending(self, waited: float) -> None:
        """The stopping worker waits no longer for these emails."""
        logger.warning("email for user %s: still being sent %.0fs after the worker began "
                       "to stop, and not waited for any longer; if it goes out, it is not "
                       "recorded, and its rows go out again when their claim's lease ends "
                       "(%.0fs after the claim)", self.user_id, waited,
                       store.CLAIM_LEASE_SECONDS)

    def take(self) -> list[SendOutcome] | None:
        """The outcomes told in `_Sent` (the actor's thread); None once let go."""
        with self._lock:
            outcomes, self._outcomes = self._outcomes, None
        return outcomes

    def let_go(self) -> None:
        """The actor is stopping or crashing (its thread): settle what it was told but
        will not handle, and have what comes later settled likewise."""
        with self._lock:
            self._let_go = True
            outcomes, self._outcomes = self._outcomes, None
        if outcomes is not None:
            self._settle(outcomes)

    def _settle(self, outcomes: list[SendOutcome]) -> None:
        _count_sent(outcomes, self.deadline)
        # No actor to answer: the claimer sees the settle through by itself.
        self._claimer.settle(_settlement(self.claim_id, self.user_id, outcomes), None)


class UserBatchActor(SupervisedMixin, PooledActor):
    """Owns one user's email batch.

    Parameters:
      user_id: whose batch.
      context: shared timers, mail dispatcher and settings.
      router: the BatchRouter, told when this actor may retire.

    Runs on the shared actor pool; timer callbacks run on the timer thread and only
    `tell`; claims run on the claimer's thread and SMTP on the mail dispatcher's
    threads, which `tell` their answers. A flush is a chain of messages (`Claimed`,
    `_Sent`, `Settled`), so no pool thread waits on the database or SMTP. An actor
    stopped while its claim is answered abandons it, and the claimer hands the rows
    back; one stopped while its emails are out lets go of their `_Delivery`, and the
    claimer settles them.
    """

    def __init__(self, user_id: int, context: BatchContext, router: pykka.ActorRef[Any]) -> None:
        super().__init__()
        self.user_id = user_id
        self.ctx = context
        self.router = router
        self.supervisor_ref = router
        self.supervision_key = user_id
        self._handled = 0
        self._deadline: float | None = None
        self._timer: TimerHandle | None = None
        self._token = 0
        # From the claim request until the claim is settled: a flush is in flight.
        self._busy = False
        self._flush_started = 0.0
        # A "flush now" that came while a send was in flight: done when that send ends.
        self._flush_requested = False
        # What the claimer is serving for the flush in flight, to ask again if the
        # database call fails, and how many times in a row it has.
        self._request: ClaimerRequest | None = None
        self._db_failures = 0
        # Set while that request waits to be asked again.
        self._retry_timer: TimerHandle | None = None
        # The flush's emails, from their hand-over to the mail dispatcher until `_Sent`.
        self._delivery: _Delivery | None = None

    # Pykka hooks (pool thread) ---------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Rearm | FlushNow):
            self._handled += 1  # only what the router routed counts toward retiring
        if isinstance(message, Rearm):
            self._arm(message.deadline if message.deadline is not None
                      else self._read_deadline())
        elif isinstance(message, FlushNow):
            self._flush(forced=True)
        elif isinstance(message, _Fire):
            if message.token == self._token:
                self._timer = None
                self._flush(forced=False)
        elif isinstance(message, Claimed):
            self._db_failures = 0
            if self._request is not None:
                self.ctx.claimer.taken(self._request)
            self._claimed(message)
        elif isinstance(message, _Sent):
            self._sent(message.delivery)
        elif isinstance(message, Settled):
            self._db_failures = 0
            self._request = None
            self._done(message.wakeup)
        elif isinstance(message, ClaimFailed):
            self._retry_later(message.exc_info[1])
        elif isinstance(message, _Retry):
            self._retry_timer = None
            self.ctx.claimer.again(message.request)
        self._maybe_retire()
        return None

    def on_stop(self) -> None:
        self._cancel_timer()
        self._hand_over_retry()
        self._abandon_claim()
        self._let_go_of_delivery()

    def on_crash(self) -> None:
        self._cancel_timer()
        self._hand_over_retry()
        self._abandon_claim()
        self._let_go_of_delivery()

    def _abandon_claim(self) -> None:
        # A `Claimed` still in the inbox dies with this actor, and one told later cannot
        # reach it: the claimer hands either's rows back.
        if self._request is not None:
            self.ctx.claimer.abandon(self._request)

    def _hand_over_retry(self) -> None:
        # A settle waiting to be asked again would die with this actor, and its sent
        # rows would go out again after the lease: the claimer sees it through.
        if self._retry_timer is not None and self._request is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
            self.ctx.claimer.hand_over(self._request)

    def _let_go_of_delivery(self) -> None:
        # A `_Sent` still in the inbox dies with this actor, and one told later cannot
        # reach it: the delivery has the claimer settle either.
        if self._delivery is not None:
            self._delivery.let_go()
            self._delivery = None

    # Timer ---------------------------------------------------------------------------

    def _arm(self, when: float | None) -> None:
        if when is None:
            return
        if self._timer is not None and self._deadline is not None and self._deadline <= when:
            return
        self._cancel_timer()
        self._token += 1
        token, me = self._token, self.actor_ref
        self._deadline = when
        self._timer = self.ctx.timers.call_later(
            max(0.0, when - time.time()), lambda: _tell(me, _Fire(token))
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = None

    # Flushing ------------------------------------------------------------------------

    def _flush(self, *, forced: bool) -> None:
        if self._busy:
            # The flush in flight re-arms when it is done; a forced flush must not
            # wait for the next window, so remember it for then.
            self._flush_requested = self._flush_requested or forced
            return
        self._busy = True
        self._flush_started = self._deadline or time.time()
        self._cancel_timer()
        self._request = self.ctx.claimer.claim(self.user_id, forced, self.actor_ref)

    def _claimed(self, message: Claimed) -> None:
        batch = message.batch
        if batch is None:
            self._done(message.wakeup)
            return
        user = batch.user
        if user is None or not user.enable_offline_email_notifications or not batch.rows:
            self._settle(store.Settlement(batch.claim_id, self.user_id, None))
            return
        emails, unrendered = self._render(user, batch)
        if not emails:
            # Nothing to send: settle the unrendered conversations as if SMTP had
            # refused them, without a round trip through the mail threads.
            self._settle_outcomes(batch.claim_id, self._flush_started, unrendered)
            return
        self._delivery = _Delivery(batch.claim_id, self.user_id, self._flush_started,
                                   unrendered, self.actor_ref, self.ctx.claimer)
        self.ctx.mail.send(emails, self._delivery)

    def _render(
        self, user: store.BatchUser, batch: store.Batch
    ) -> tuple[list[tuple[list[int], Any]], list[SendOutcome]]:
        """The batch's emails, one per conversation, each with its rows; and the
        outcomes of the conversations that could not be rendered.

        A rendering failure comes from the data (a message's HTML, the user's address
        or realm URL), so every later try would fail the same way. Raised here, it
        would crash this actor with the rows still claimed, and each restart after the
        lease would crash it again: the user's emails never sent nor dead-lettered,
        and the BatchRouter's restart budget spent. So a conversation that fails is a
        permanent failure, settled like an SMTP 5xx (its rows go to the dead letters
        with the reason), and the user's other conversations still go out.
        """
        settings = self.ctx.settings
        recipient = Recipient(user.id, user.email, user.full_name, user.realm_name,
                              user.realm_url)
        out: list[tuple[list[int], Any]] = []
        unrendered: list[SendOutcome] = []
        # One email per conversation; render per conversation to know each one's rows.
        for ids, items in _conversations(batch):
            try:
                messages = render_digest(
                    recipient, items, from_addr=settings.EMAIL_FROM,
                    unsubscribe_url=unsubscribe_url(settings.public_url, user.id,
                                                    settings.secret_key),
                    max_messages=settings.EMAIL_MAX_MESSAGES,
                )
            except Exception as error:
                unrendered.append(SendOutcome(ids, "permanent",
                                              self._render_failed(ids, error)))
                continue
            for message in messages:
                out.append((ids, message))
        return out, unrendered

    def _render_failed(self, ids: list[int], error: Exception) -> str:
        """Log a conversation's rendering failure; return its dead-letter reason.

        Both name the exception's type and where it was raised, never its text: that
        can quote the message (an attribute's value, a piece of HTML), and message
        content stays out of logs and dead-letter reasons alike. The log adds the
        stack: file names, lines and source code, no data.
        """
        frames = traceback.extract_tb(error.__traceback__, limit=-RENDER_FAILURE_STACK_FRAMES)
        where = _failure_place(frames)
        reason = f"rendering failed: {type(error).__name__}{where}"
        logger.error("email for user %s: %d message(s) of one conversation could not be "
                     "rendered (%s%s); they go to the dead letters\nStack (most recent "
                     "call last):\n%s", self.user_id, len(ids), type(error).__name__,
                     where, "".join(traceback.format_list(frames)).rstrip())
        return reason

    def _sent(self, delivery: _Delivery) -> None:
        self._delivery = None
        outcomes = delivery.take()
        if outcomes is not None:  # None only once let go, and this actor is then gone
            self._settle_outcomes(delivery.claim_id, delivery.deadline, outcomes)

    def _settle_outcomes(self, claim_id: str, deadline: float,
                         outcomes: list[SendOutcome]) -> None:
        _count_sent(outcomes, deadline)
        self._settle(_settlement(claim_id, self.user_id, outcomes))

    def _settle(self, settlement: store.Settlement) -> None:
        self._request = self.ctx.claimer.settle(settlement, self.actor_ref)

    def _read_deadline(self) -> float | None:
        """The batch's deadline from the database; when the database is out of reach,
        a moment from now: the flush then claims nothing yet, and its claim (which
        waits for the database) answers with the deadline."""
        try:
            return _db(store.next_wakeup, self.user_id)  # type: ignore[no-any-return]
        except DATABASE_UNAVAILABLE as error:
            delay = _backoff_seconds(self.ctx.settings, 0)
            logger.warning("email for user %s: could not read the batch's deadline (%s), "
                           "looking again in %.1fs", self.user_id, type(error).__name__,
                           delay)
            return time.time() + delay

    def _retry_later(self, error: BaseException) -> None:
        """The claimer's database call for this flush failed. When the database was
        out of reach, ask again after a backoff: a restart or failover must not crash
        every actor whose batch falls due meanwhile, and a settle asked again keeps
        the sent rows from going out twice. Anything else crashes the actor, so that
        its supervisor restarts it from the database."""
        if not isinstance(error, DATABASE_UNAVAILABLE) or self._request is None:
            self._busy = False
            raise error
        self._db_failures += 1
        delay = min(DB_RETRY_MAX_SECONDS,
                    _backoff_seconds(self.ctx.settings, self._db_failures - 1))
        logger.warning("email for user %s: the database call failed (%s), trying again "
                       "in %.1fs", self.user_id, type(error).__name__, delay)
        retry, me = _Retry(self._request), self.actor_ref
        self._retry_timer = self.ctx.timers.call_later(delay, lambda: _tell(me, retry))

    def _done(self, wakeup: float | None) -> None:
        """The flush in flight is over; `wakeup` is when to look again."""
        self._busy = False
        if self._flush_requested:
            self._flush_requested = False
            self._flush(forced=True)
            return
        self._arm(wakeup)

    def _maybe_retire(self) -> None:
        if self._timer is None and not self._busy:
            _tell(self.router, _Retire(self.user_id, self.actor_urn, self._handled))


class BatchRouter(SupervisorMixin, SupervisedMixin, pykka.ThreadingActor):
    """Creates, supervises and retires UserBatchActors; one per process.

    Parameters:
      context: what the user actors share.
      supervisor_ref: the root supervisor.
    """

    def __init__(self, context: BatchContext, supervisor_ref: pykka.ActorRef[Any] | None) -> None:
        super().__init__()
        self.ctx = context
        self.supervisor_ref = supervisor_ref
        self.supervision_key = "batch_router"
        self._children: dict[int, list[Any]] = {}
        self._sweep_timer: TimerHandle | None = None
        s = context.settings
        self._init_supervision(
            "BatchRouter", s.SUPERVISOR_MAX_RESTARTS, s.SUPERVISOR_PERIOD_SECONDS,
            schedule=lambda delay, fn: context.timers.call_later(delay, fn),
        )

    def on_start(self) -> None:
        self._rearm_all()
        self._schedule_sweep()

    def on_stop(self) -> None:
        self._stop_children()

    def on_crash(self) -> None:
        self._stop_children()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Route):
            return self._route(message.user_id, message.message)
        if isinstance(message, Recorded):
            for user_id, deadline in message.arm.items():
                self._tell_child(user_id, FlushNow() if user_id in message.flush_now
                                 else Rearm(deadline))
            return None
        if isinstance(message, _Retire):
            self._retire(message)
        elif isinstance(message, ChildFailed):
            self._on_child_failed(message)
        elif isinstance(message, RestartChild):
            self._on_restart_child(message)
        elif isinstance(message, _Sweep):
            self._rearm_all()
            self._schedule_sweep()
        elif isinstance(message, PendingCount):
            return len(self._children)
        elif isinstance(message, ChildUrns):
            return {user: entry[0].actor_urn for user, entry in self._children.items()}
        return None

    def _route(self, user_id: int, message: Any) -> pykka.Future[Any]:
        entry = self._children.get(user_id)
        if entry is None:
            entry = self._start_child(user_id)
        entry[1] += 1
        return entry[0].ask(message, block=False)  # type: ignore[no-any-return]

    def _tell_child(self, user_id: int, message: Any) -> None:
        entry = self._children.get(user_id)
        if entry is None:
            entry = self._start_child(user_id)
        entry[1] += 1
        entry[0].tell(message)

    def _start_child(self, user_id: int) -> list[Any]:
        ref = UserBatchActor.start(user_id, self.ctx, self.actor_ref)
        entry = [ref, 0]
        self._children[user_id] = entry
        PENDING_EMAIL_USERS.set(len(self._children))
        return entry

    def _retire(self, message: _Retire) -> None:
        entry = self._children.get(message.user_id)
        if entry is None or entry[0].actor_urn != message.actor_urn:
            return
        if entry[1] != message.handled:
            return  # a message is on its way to it: keep it
        del self._children[message.user_id]
        PENDING_EMAIL_USERS.set(len(self._children))
        entry[0].stop(block=False)

    def _rearm_all(self) -> None:
        try:
            pending = _db(store.pending_users)
        except Exception:
            logger.exception("could not read pending email users")
            return
        for user_id, deadline in pending:
            if user_id not in self._children:
                self._tell_child(user_id, Rearm(deadline))

    def _schedule_sweep(self) -> None:
        me = self.actor_ref
        self._sweep_timer = self.ctx.timers.call_later(
            SWEEP_INTERVAL_SECONDS, lambda: _tell(me, _Sweep())
        )

    def _stop_children(self) -> None:
        """Stop every UserBatchActor, and wait (at most `CHILDREN_STOP_SECONDS`) until
        they have: each lets go of its emails in flight as it stops, and the claimer,
        which the tree stops after the mail dispatcher, settles what they came to.
        Runs on the router's thread."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        stops = [ref.stop(block=False) for ref, _count in self._children.values()]
        self._children.clear()
        PENDING_EMAIL_USERS.set(0)
        deadline = time.monotonic() + CHILDREN_STOP_SECONDS
        late = 0
        for stop in stops:
            try:
                stop.get(timeout=max(0.0, deadline - time.monotonic()))
            except pykka.Timeout:
                late += 1
        if late:
            logger.warning("%d of %d UserBatchActors had not stopped %.0fs after their "
                           "router: emails they are sending may not be recorded, and go "
                           "out again when their claims' leases end", late, len(stops),
                           CHILDREN_STOP_SECONDS)

    # Supervision -----------------------------------------------------------------------

    def _current_child_urn(self, key: Any) -> str | None:
        entry = self._children.get(key)
        return entry[0].actor_urn if entry else None

    def _forget_child(self, key: Any) -> None:
        self._children.pop(key, None)
        PENDING_EMAIL_USERS.set(len(self._children))

    def _restart(self, key: Any) -> None:
        if key not in self._children:
            self._route(int(key), Rearm())

    def _child_kind(self, key: Any) -> str:
        return "UserBatchActor"


# Helpers --------------------------------------------------------------------------


def _db(fn: Callable[..., Any], *args: Any) -> Any:
    # Pool and router threads are few and long-lived: each keeps its connection.
    return in_thread_connection(fn, *args)


def _tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


def _failure_place(frames: traceback.StackSummary) -> str:
    """Where a rendering failure was raised: `` in urlsplit (urllib/parse.py:497)``.

    When that is library code, the innermost rendering frame follows (``, from
    _absolute_http_url (rendering/email.py:170)``): the library function alone does
    not say which input of the email it choked on.
    """
    if not frames:
        return ""
    place = f" in {_frame_name(frames[-1])}"
    if not _in_rendering(frames[-1]):
        ours = [frame for frame in frames if _in_rendering(frame)]
        if ours:
            place += f", from {_frame_name(ours[-1])}"
    return place


def _in_rendering(frame: traceback.FrameSummary) -> bool:
    return PurePath(frame.filename).parent == _RENDERING_DIR


def _frame_name(frame: traceback.FrameSummary) -> str:
    """``function (folder/file.py:line)``: enough to find the code, no full path."""
    path = PurePath(frame.filename)
    short = "/".join(path.parts[-RENDER_FAILURE_PATH_PARTS:])
    return f"{frame.name} ({short}:{frame.lineno})"


def _count_sent(outcomes: list[SendOutcome], deadline: float) -> None:
    """Count a flush's sent emails, and how late after its deadline they went."""
    sent = sum(1 for o in outcomes if o.status == "sent")
    if sent:
        EMAILS_SENT.inc(sent)
        EMAIL_SEND_LATENESS.observe(max(0.0, time.time() - deadline))


def _settlement(claim_id: str, user_id: int,
                outcomes: list[SendOutcome]) -> store.Settlement:
    """How a flush ended, from its emails' outcomes."""
    unsent = [store.Unsent(o.message_ids, o.reason, o.status == "transient")
              for o in outcomes if o.status != "sent"]
    if not unsent:
        return store.Settlement(claim_id, user_id, None)
    sent = [i for o in outcomes if o.status == "sent" for i in o.message_ids]
    return store.Settlement(claim_id, user_id, sent, unsent)


def retry_policy(settings: Settings) -> store.RetryPolicy:
    """Email tries: `RETRY_MAX_TRIES`, with the intake's backoff between them."""
    return store.RetryPolicy(settings.RETRY_MAX_TRIES,
                             lambda tries: _backoff_seconds(settings, tries - 1))


def _backoff_seconds(settings: Settings, attempts: int) -> float:
    _, ms = compute_backoff(
        max(0, attempts), factor=settings.RETRY_MIN_BACKOFF_MS,
        max_backoff=settings.RETRY_MAX_BACKOFF_MS,
    )
    return ms / 1000.0


def _conversations(batch: store.Batch) -> list[tuple[list[int], list[DigestItem]]]:
    """Split a batch by conversation with `render_digest`'s own key: each group is
    rendered on its own, so a key any finer (a stream name's case, say) would send one
    conversation as several emails."""
    groups: dict[Any, tuple[list[int], list[DigestItem]]] = {}
    for row in sorted(batch.rows, key=lambda r: batch.messages[r.message_id].date_sent):
        m = batch.messages[row.message_id]
        ids, items = groups.setdefault(conversation_key(m), ([], []))
        ids.append(row.message_id)
        items.append(DigestItem(m, row.trigger, row.mentioned_user_group_name))
    return list(groups.values())


def new_worker_id() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**6):06x}"
