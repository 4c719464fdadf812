"""Supervision for Pykka actors, which have none of their own.

A supervised child reports its crash to its supervisor from `on_failure` (which Pykka
runs on the child's own thread just before it stops). A child whose `on_start` raises
reports the same way: Pykka alone would only log it and stop the actor, and no
supervisor would ever restart it. The supervisor, on its own thread, restarts the
child from durable state after a backoff, within a restart budget: at most
`max_restarts` restarts in `period_seconds`, as Erlang's intensity/period. A
supervisor past its budget fails itself, so its own supervisor restarts it and, with
it, every child; the root past its budget gives up and the process exits non-zero for
its process manager to restart.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import pykka

from metrics import ACTOR_RESTARTS

logger = logging.getLogger("herald.supervision")

# First delay before restarting a child that just crashed (seconds).
RESTART_BACKOFF_MIN = 0.05
# Longest delay between restarts of a child that keeps crashing (seconds).
RESTART_BACKOFF_MAX = 5.0
# A child that has run this long since its last crash was doing well: its next crash
# starts the backoff afresh (seconds).
RESTART_BACKOFF_RESET_SECONDS = 60.0


@dataclass(frozen=True)
class ChildFailed:
    """Told to a supervisor by a child that crashed."""

    key: Hashable
    actor_urn: str
    error: str


@dataclass(frozen=True)
class RestartChild:
    """Told to a supervisor by its own backoff timer."""

    key: Hashable


class RestartBudget:
    """Erlang's restart intensity: at most `max_restarts` within `period_seconds`.

    Parameters:
      max_restarts: restarts allowed inside one window.
      period_seconds: the sliding window's length.
      clock: monotonic time source (tests pass a fake one).
    """

    def __init__(
        self,
        max_restarts: int,
        period_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_restarts = max_restarts
        self.period_seconds = period_seconds
        self._clock = clock
        self._restarts: collections.deque[float] = collections.deque()

    def allow(self) -> bool:
        """Record one restart; False when it would exceed the budget."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self.period_seconds:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True


class RestartBackoff:
    """How long a supervisor waits before restarting a crashed child: from
    `RESTART_BACKOFF_MIN`, doubling with each crash that follows the child's last one
    within `reset_seconds`, up to `RESTART_BACKOFF_MAX`. A child that crashes once a day
    is restarted at once every time, not after the longest delay for good.

    Parameters:
      reset_seconds: how long after its last crash a child's crashes count afresh.
      clock: monotonic time source (tests pass a fake one).
    """

    def __init__(
        self,
        reset_seconds: float = RESTART_BACKOFF_RESET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reset_seconds = reset_seconds
        self._clock = clock
        # Per child: crashes in a row, and when the last one was.
        self._crashes: dict[Hashable, tuple[int, float]] = {}

    def delay(self, key: Hashable) -> float:
        """Record a crash of child `key`; the seconds to wait before restarting it."""
        now = self._clock()
        # Children that have been well for a while are forgotten, so that the table
        # does not grow with every user whose actor ever crashed.
        self._crashes = {k: v for k, v in self._crashes.items()
                         if now - v[1] <= self.reset_seconds}
        in_a_row = self._crashes.get(key, (0, now))[0]
        self._crashes[key] = (in_a_row + 1, now)
        return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * (2**in_a_row)))


class SupervisedMixin:
    """Mixed into an actor whose crashes its supervisor should hear about.

    Parameters (attributes set by the supervisor before start):
      supervisor_ref: the supervisor to tell, or None for an unsupervised actor.
      supervision_key: how the supervisor names this child.
    """

    supervisor_ref: pykka.ActorRef[Any] | None = None
    supervision_key: Hashable = None
    actor_urn: str

    def _actor_loop_setup(self) -> None:
        """Pykka's start step, which both `pykka.ThreadingActor`'s loop and
        `PooledActor`'s first slice call: runs `on_start` on the child's thread (a pool
        thread for a pooled actor) before its first message.

        Pykka logs an `on_start` that raises and stops the actor without calling
        `on_failure`. Here a failed start ends as a message that raised does in
        Pykka's receive loop: the actor is logged, unregistered and marked stopped (so
        that senders get `ActorDeadError` from then on), then `on_failure` cleans up
        and tells the supervisor, which restarts the child within its budget.
        """
        actor = cast("pykka.Actor", self)
        try:
            actor.on_start()
        except Exception:
            failure = sys.exc_info()
            actor._handle_failure(*failure)
            try:
                actor.on_failure(*failure)
            except Exception:
                actor._handle_failure(*sys.exc_info())

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Runs on the child's thread as it dies, of a message or of its start: clean
        up, then tell the supervisor."""
        try:
            self.on_crash()
        except Exception:
            # A clean-up that fails must not keep the supervisor from hearing of the
            # crash: the child would then never be restarted.
            logger.exception("%s: clean-up after its crash failed", self.actor_urn)
        if self.supervisor_ref is not None:
            error = f"{exception_type.__name__ if exception_type else 'Error'}: {exception_value}"
            try:
                self.supervisor_ref.tell(
                    ChildFailed(self.supervision_key, self.actor_urn, error[:500])
                )
            except pykka.ActorDeadError:
                pass

    def on_crash(self) -> None:
        """Release resources held by the crashed child (runs on its thread). After a
        failed start, only part of them may have been acquired."""


class SupervisorMixin:
    """Restart logic for an actor that supervises children.

    The supervising actor calls `_init_supervision()` in its constructor, handles
    `ChildFailed` and `RestartChild` messages with `_on_child_failed` and
    `_on_restart_child`, and implements `_restart(key)` to start a fresh child from
    durable state. Everything runs on the supervisor's own thread.
    """

    _budget: RestartBudget
    _backoff: RestartBackoff
    _supervisor_name: str
    _schedule: Callable[[float, Callable[[], None]], Any]

    def _init_supervision(
        self,
        name: str,
        max_restarts: int,
        period_seconds: float,
        schedule: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self._supervisor_name = name
        self._budget = RestartBudget(max_restarts, period_seconds)
        self._backoff = RestartBackoff()
        self._schedule = schedule or _thread_timer

    def _current_child_urn(self, key: Hashable) -> str | None:
        raise NotImplementedError

    def _forget_child(self, key: Hashable) -> None:
        raise NotImplementedError

    def _restart(self, key: Hashable) -> None:
        raise NotImplementedError

    def _give_up(self, reason: str) -> None:
        """Past the budget: fail this supervisor so that its own supervisor acts."""
        raise SupervisorGaveUp(reason)

    def _on_child_failed(self, failed: ChildFailed) -> None:
        if self._current_child_urn(failed.key) != failed.actor_urn:
            return  # an older incarnation, already replaced
        self._forget_child(failed.key)
        logger.error(
            "%s: child %s crashed: %s", self._supervisor_name, failed.key, failed.error
        )
        if not self._budget.allow():
            self._give_up(
                f"{self._supervisor_name}: more than {self._budget.max_restarts} restarts "
                f"in {self._budget.period_seconds:g}s (last: {failed.key}: {failed.error})"
            )
            return
        delay = self._backoff.delay(failed.key)
        me = self._self_ref()
        self._schedule(delay, lambda: _tell_quietly(me, RestartChild(failed.key)))

    def _on_restart_child(self, message: RestartChild) -> None:
        ACTOR_RESTARTS.labels(self._child_kind(message.key)).inc()
        logger.warning("%s: restarting child %s", self._supervisor_name, message.key)
        self._restart(message.key)

    def _child_kind(self, key: Hashable) -> str:
        return type(self).__name__

    def _self_ref(self) -> pykka.ActorRef[Any]:
        return self.actor_ref  # type: ignore[attr-defined, no-any-return]


class SupervisorGaveUp(Exception):
    """A supervisor exceeded its restart budget."""


def _tell_quietly(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


def _thread_timer(delay: float, fn: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()
    return timer
