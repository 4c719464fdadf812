"""The inbox of a pooled actor: a message queue that also schedules its actor.

The inbox is what lets Pykka's own receive loop,
`pykka.Actor._actor_loop_running`, run in slices on a shared pool of threads.
Pykka fetches the next envelope with `get()` *outside* the try-block that
guards message handling, so an exception raised by `get()` leaves the loop
without touching the actor's state. This inbox raises such an exception
when it has nothing more to give for now (it is empty, or the slice has used
up its share of messages), and the pool thread is free for other actors.

Whether an actor is queued on, or running on, a pool thread is decided by a
single "run token" per inbox, a `threading.Lock`:

- whoever holds the token is responsible for running the actor: it is held
  from `start()` until the first slice is queued, by every queued or running
  slice, and forever once the actor is dead;
- a producer that puts a message and manages to take a free token queues the
  actor on its pool;
- a slice that finds the inbox empty releases the token, then looks at the
  inbox once more; a message that arrived in between is either seen by that
  second look (and the slice takes the token back and carries on) or its
  producer took the token and queued the actor again. When the slice that
  producer queued has already handled the message by the time the first one
  takes the token back, the first finds nothing, releases the token and
  looks again.

Either way no message is left in an idle inbox, and only one thread at a time
runs the actor.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

from pykka import ActorDeadError, messages

if TYPE_CHECKING:
    from pykka._envelope import Envelope

    from actors.runtime._pool import ActorPool, PooledActor

__all__ = ["PooledInbox"]


class _InboxIdle(Exception):
    """Raised by `PooledInbox.get()` when the inbox is empty.

    The run token has already been released when this is raised: the pool
    thread must not touch the actor again.
    """


class _SliceExhausted(Exception):
    """Raised by `PooledInbox.get()` when the slice has used its message budget.

    The raising thread still holds the run token and must queue the actor
    again.
    """


class PooledInbox:
    """Inbox of a [`PooledActor`][actors.runtime.PooledActor].

    It satisfies Pykka's `ActorInbox` protocol (`put()`, `get()`, `empty()`):

    - `put()` is called by any thread (through `ActorRef.tell()`,
      `ActorRef.ask()` and proxies) and never blocks on the actor;
    - `get()` and `empty()` are called only by the pool thread that
      currently runs the actor, from Pykka's receive loop and teardown.

    The inbox is created by `PooledActor._create_actor_inbox()` before the
    actor exists, and is bound to its actor and pool when the actor starts.
    """

    __slots__ = (
        "_actor",
        "_budget",
        "_dead",
        "_dead_message",
        "_draining",
        "_pool",
        "_queue",
        "_token",
    )

    def __init__(self) -> None:
        # SimpleQueue is a small C object (a deque is ten times its size),
        # which matters with a hundred thousand idle actors.
        self._queue: queue.SimpleQueue[Envelope[Any]] = queue.SimpleQueue()
        self._token = threading.Lock()
        # Held until the actor starts, so messages sent from the actor's
        # __init__() wait for on_start(), as with Pykka's ThreadingActor.
        self._token.acquire()
        self._actor: PooledActor | None = None
        self._pool: ActorPool | None = None
        self._budget = 0
        self._draining = False
        self._dead = False
        self._dead_message = ""

    def put(self, envelope: Envelope[Any], /) -> None:
        """Add a message; queue the actor on its pool if it was idle.

        Runs on the sender's thread.

        Raises:
            RuntimeError: if the actor had to be queued on a pool that has
                been shut down.
        """
        self._queue.put(envelope)
        if self._token.acquire(blocking=False):
            assert self._pool is not None
            assert self._actor is not None
            self._pool.submit(self._actor)
        elif self._dead:
            # The actor's final drain may already be over: reply here so an
            # ask() racing with the actor's stop does not wait forever.
            self._reject_pending()

    def get(self) -> Envelope[Any]:
        """Take the next message, or leave the receive loop.

        Runs on the pool thread that holds the run token.

        Raises:
            _SliceExhausted: the slice has handled its share of messages; the
                caller still holds the run token.
            _InboxIdle: the inbox is empty and the run token was released.
        """
        if self._draining:
            return self._queue.get_nowait()
        if self._budget <= 0 and not self._queue.empty():
            raise _SliceExhausted
        self._budget -= 1
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        self._token.release()
        # A producer may have put a message after our failed get but before
        # the release; its own acquire failed, so one of us must still run
        # the actor. If the producer wins the token instead, it has queued
        # the actor and this slice must go.
        while not self._queue.empty() and self._token.acquire(blocking=False):
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                # Between our look and our acquire, a producer took the free
                # token, and the slice it queued handled that message and went
                # idle. Give the token back and look again.
                self._token.release()
        raise _InboxIdle

    def empty(self) -> bool:
        """Tell whether the inbox holds no messages.

        Runs on the pool thread that holds the run token; from any other
        thread the answer may be stale when it arrives.
        """
        return self._queue.empty()

    def qsize(self) -> int:
        """Return the approximate number of queued messages (for metrics)."""
        return self._queue.qsize()

    def _bind(self, actor: PooledActor, pool: ActorPool) -> None:
        """Attach the inbox to its actor and pool.

        Runs on the thread calling `PooledActor.start()`, which holds the run
        token and queues the first slice right after.
        """
        self._actor = actor
        self._pool = pool

    def _begin_slice(self, budget: int) -> None:
        """Give the slice that is about to run its message budget."""
        self._budget = budget

    def _begin_teardown(self) -> None:
        """Let Pykka's teardown empty the inbox without leaving the loop."""
        self._draining = True

    def _close(self) -> None:
        """Mark the inbox dead and reply to anything still in it.

        Runs on the pool thread that ran the actor's teardown; the run token
        stays held forever so the actor is never queued again.
        """
        if self._actor is not None:
            self._dead_message = f"{self._actor.actor_ref} stopped before handling the message"
        self._dead = True
        # The actor object is no longer needed; refs that outlive it keep
        # only this small inbox alive.
        self._actor = None
        self._reject_pending()

    def _reject_pending(self) -> None:
        """Reply to every queued ask as Pykka's teardown does.

        May run on the pool thread and on senders' threads at once; each
        envelope is taken by exactly one of them.
        """
        while True:
            try:
                envelope = self._queue.get_nowait()
            except queue.Empty:
                return
            if envelope.reply_to is None:
                continue
            if isinstance(envelope.message, messages._ActorStop):
                envelope.reply_to.set(None)
            else:
                envelope.reply_to.set_exception(
                    exc_info=(
                        ActorDeadError,
                        ActorDeadError(self._dead_message),
                        None,
                    )
                )
