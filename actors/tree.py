"""The actor tree of a worker process, and the face it shows to the queue consumers.

    RootSupervisor
    ├── ShardRouter ──► PushActor[0..PUSH_SHARDS-1]
    └── BatchRouter ──► UserBatchActor[user]   (pooled; one per user with pending email)

`ActorTree` builds and stops the tree and implements `intake.consumers.Handlers`:
its methods run on Dramatiq worker threads and block until the actors report the
work done (a push answered by the providers) or durably recorded (an email row
committed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors import _batch_store as batch_store
from actors._batch_claimer import BatchClaimer
from actors._email_recorder import EmailRecorder, Recorded
from actors._mail import MailDispatcher
from actors._push_engine import PushWork
from actors.batch import (
    BatchContext,
    BatchRouter,
    PendingCount,
    Rearm,
    Route,
    UserBatchActor,
    new_worker_id,
    retry_policy,
)
from actors.runtime import ActorPool, TimerWheel
from actors.shard_router import PushShard, ShardRouter, ShardTable
from actors.supervision import ChildFailed, RestartChild, SupervisorMixin
from delivery.outcomes import TransientDeliveryError
from delivery.smtp import Mailer
from models import db
from settings import Settings

logger = logging.getLogger("herald.actors")

# How long a consumer waits for the actor tree before retrying the message later.
HANDOFF_TIMEOUT_SECONDS = 120.0
# How often a consumer waiting for its push looks whether its PushActor is gone
# (seconds).
GONE_POLL_SECONDS = 1.0
# How long a consumer waits for the routers (and the first shard table) at start-up.
ROUTER_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class _Routers:
    shard: pykka.ActorRef[Any] | None
    batch: pykka.ActorRef[Any] | None


class RootSupervisor(SupervisorMixin, pykka.ThreadingActor):
    """Root of the tree: starts both routers and restarts them within its budget.

    Parameters:
      settings: the restart budget.
      make_children: name → function starting that child with this actor as parent.
      publish: called (on this actor's thread) with the current router refs.
      give_up: called when the root's own budget is spent; the process must exit.
    """

    def __init__(
        self,
        settings: Settings,
        make_children: dict[str, Callable[[pykka.ActorRef[Any]], pykka.ActorRef[Any]]],
        publish: Callable[[dict[str, pykka.ActorRef[Any]]], None],
        give_up: Callable[[str], None],
    ) -> None:
        super().__init__()
        self._make = make_children
        self._publish = publish
        self._give_up_cb = give_up
        self._children: dict[str, pykka.ActorRef[Any]] = {}
        self._init_supervision(
            "RootSupervisor", settings.SUPERVISOR_MAX_RESTARTS, settings.SUPERVISOR_PERIOD_SECONDS
        )

    def on_start(self) -> None:
        for name in self._make:
            self._restart(name)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ChildFailed):
            self._on_child_failed(message)
        elif isinstance(message, RestartChild):
            self._on_restart_child(message)
        return None

    def on_stop(self) -> None:
        # Stop the routers in turn; each stops its own children first.
        for name in reversed(list(self._children)):
            try:
                self._children[name].stop(block=True, timeout=60)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self._children.clear()

    def _current_child_urn(self, key: Any) -> str | None:
        ref = self._children.get(key)
        return ref.actor_urn if ref else None

    def _forget_child(self, key: Any) -> None:
        self._children.pop(key, None)
        self._publish(dict(self._children))

    def _restart(self, key: Any) -> None:
        self._children[key] = self._make[key](self.actor_ref)
        self._publish(dict(self._children))

    def _child_kind(self, key: Any) -> str:
        return str(key)

    def _give_up(self, reason: str) -> None:
        logger.critical("giving up: %s", reason)
        self._give_up_cb(reason)


class ActorTree:
    """Builds, runs and stops a worker's actors; the consumers' `Handlers`.

    Parameters:
      settings: everything.
      give_up: called once if the root supervisor's restart budget is spent.
      providers: optional push provider factory (tests, benchmarks).
      mailer_factory: optional email sender factory (tests, benchmarks).
    """

    def __init__(
        self,
        settings: Settings,
        give_up: Callable[[str], None],
        providers: Callable[[Settings], tuple[Any, Any, Any]] | None = None,
        mailer_factory: Callable[[], Mailer] | None = None,
    ) -> None:
        self.settings = settings
        self._give_up = give_up
        self._providers = providers
        self._mailer_factory = mailer_factory
        self._routers = _Routers(None, None)
        self._routers_changed = threading.Condition()
        # {shard: PushShard}, as the ShardRouter last published it; None before that.
        self._shards: ShardTable | None = None
        self.pool: ActorPool | None = None
        self.timers: TimerWheel | None = None
        self.mail: MailDispatcher | None = None
        self.recorder: EmailRecorder | None = None
        self.claimer: BatchClaimer | None = None
        self.root: pykka.ActorRef[Any] | None = None

    def start(self) -> None:
        s = self.settings
        self.timers = TimerWheel()
        self.pool = ActorPool(s.ACTOR_POOL_THREADS, name="herald-actor-pool")
        UserBatchActor.actor_pool = self.pool
        self.mail = MailDispatcher(s, self._mailer_factory)
        timers = self.timers
        self.claimer = BatchClaimer(new_worker_id(), retry_policy(s),
                                    lambda delay, fn: timers.call_later(delay, fn))
        self.claimer.start()
        context = BatchContext(s, self.timers, self.mail, self.claimer)
        make = {
            "shard_router": lambda parent: ShardRouter.start(
                s, parent, self._providers, lambda delay, fn: timers.call_later(delay, fn),
                self._publish_shards,
            ),
            "batch_router": lambda parent: BatchRouter.start(context, parent),
        }
        self.root = RootSupervisor.start(s, make, self._publish, self._give_up)
        self._wait_for_routers()
        self.recorder = EmailRecorder(self._recorded)
        self.recorder.start()

    def _publish(self, children: dict[str, pykka.ActorRef[Any]]) -> None:
        with self._routers_changed:
            self._routers = _Routers(children.get("shard_router"), children.get("batch_router"))
            self._routers_changed.notify_all()

    def _publish_shards(self, table: ShardTable) -> None:
        with self._routers_changed:
            self._shards = table
            self._routers_changed.notify_all()

    def _shard(self, shard: int) -> PushShard:
        """The shard's PushActor and engine; waits for the first table at start-up only."""
        deadline = time.monotonic() + ROUTER_WAIT_SECONDS
        with self._routers_changed:
            while self._shards is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransientDeliveryError("actor tree is starting")
                self._routers_changed.wait(remaining)
            ref = self._shards.get(shard)
        if ref is None:
            raise TransientDeliveryError(f"push shard {shard} is restarting")
        return ref

    def _wait_for_routers(self, timeout: float = ROUTER_WAIT_SECONDS) -> _Routers:
        deadline = time.monotonic() + timeout
        with self._routers_changed:
            while self._routers.shard is None or self._routers.batch is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransientDeliveryError("actor tree is restarting")
                self._routers_changed.wait(remaining)
            return self._routers

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the tree: routers finish in-flight work and stop their children."""
        if self.recorder is not None:
            self.recorder.stop()  # its last groups still reach the batch router
        if self.root is not None:
            try:
                self.root.stop(block=True, timeout=timeout)
            except (pykka.ActorDeadError, pykka.Timeout):
                logger.warning("actor tree did not stop within %ss", timeout)
        if self.mail is not None:
            self.mail.shutdown(wait=True)
        if self.claimer is not None:
            self.claimer.stop()  # hands back claims of actors that stopped meanwhile
        if self.timers is not None:
            self.timers.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # Handlers (Dramatiq worker threads) ----------------------------------------------

    def push(self, shard: int, items: list[Any]) -> list[BaseException | None]:
        work = [PushWork(event, command, pykka.ThreadingFuture()) for event, command in items]
        try:
            target = self._shard(shard)
        except TransientDeliveryError as exc:
            return [exc] * len(work)  # it is starting or restarting: retry later
        to_send = target.engine.admit(work)
        if to_send:
            try:
                target.actor.tell(to_send)
            except pykka.ActorDeadError:
                # It just crashed (its router restarts it): retry later.
                target.engine.abandon(to_send)
                error = TransientDeliveryError(f"push shard {shard} is restarting")
                for one in to_send:
                    one.reply.set_exception((TransientDeliveryError, error, None))
        deadline = time.monotonic() + HANDOFF_TIMEOUT_SECONDS
        outcomes: list[BaseException | None] = []
        for one in work:
            try:
                _wait_for_push(one.reply, deadline, target.engine.gone)
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def email(self, event: Any, command: dict[str, Any] | None) -> None:
        if command is not None:
            self._email_command(command)
            return
        if self.recorder is None:
            raise TransientDeliveryError("email recorder is not running")
        _wait(self.recorder.submit(event))

    def _recorded(self, recorded: Recorded) -> None:
        """Runs on the recorder's thread after each commit: arm the users' timers."""
        routers = self._routers
        if routers.batch is None:
            return  # restarting: the new router re-arms every pending user on start
        try:
            routers.batch.tell(recorded)
        except pykka.ActorDeadError:
            pass  # likewise

    def _email_command(self, command: dict[str, Any]) -> None:
        user_id = int(command["user_id"])
        if command["command"] == "replay_email_batch":
            _db(batch_store.restore_rows, user_id, command["rows"], time.time())
        _wait(self._route(user_id, Rearm()))

    def _route(self, user_id: int, message: Any) -> pykka.Future[Any]:
        routers = self._wait_for_routers()
        assert routers.batch is not None
        try:
            inner: pykka.Future[Any] = routers.batch.ask(Route(user_id, message))
        except pykka.ActorDeadError:
            raise TransientDeliveryError("batch router is restarting") from None
        return inner

    def pending_email_users(self) -> int:
        routers = self._routers
        if routers.batch is None:
            return 0
        try:
            return int(routers.batch.ask(PendingCount(), timeout=5))  # type: ignore[arg-type]
        except (pykka.ActorDeadError, pykka.Timeout):
            return 0

    def routers(self) -> _Routers:
        return self._routers


def _wait_for_push(reply: pykka.Future[Any], deadline: float, gone: threading.Event) -> None:
    """Wait for a push's reply until `deadline` (monotonic), or until its PushActor is
    gone without answering it: a tell that landed as the actor stopped is never
    handled, and its consumer should retry now, not after the hand-off timeout."""
    while True:
        # Replies are set before `gone`: a look after seeing it set is the last one.
        last = gone.is_set()
        remaining = deadline - time.monotonic()
        try:
            _wait(reply, 0.0 if last else max(0.0, min(remaining, GONE_POLL_SECONDS)))
            return
        except _StillWaiting:
            if last:
                raise TransientDeliveryError(
                    "push shard stopped before handling the event") from None
            if remaining <= GONE_POLL_SECONDS:
                raise  # the hand-off timeout


class _StillWaiting(TransientDeliveryError):
    """`_wait` timed out."""


def _wait(future: pykka.Future[Any], timeout: float = HANDOFF_TIMEOUT_SECONDS) -> Any:
    try:
        return future.get(timeout=timeout)
    except pykka.Timeout:
        raise _StillWaiting("timed out waiting for the actor tree") from None
    except pykka.ActorDeadError:
        raise TransientDeliveryError("actor stopped before handling the event") from None


def _db(fn: Callable[..., Any], *args: Any) -> Any:
    with db.connection_context():
        return fn(*args)
