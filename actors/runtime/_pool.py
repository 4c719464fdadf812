"""Pykka actors that share a fixed pool of threads instead of owning one each.

[`PooledActor`][actors.runtime.PooledActor] is an actor type built on the
extension points Pykka documents for new actor types
(`_create_actor_inbox()`, `_create_future()` and `_start_actor_loop()`).
Message handling is Pykka's own code: each time an actor has messages, a
pool thread runs `Actor._actor_loop_running()` until the actor's
[`PooledInbox`][actors.runtime._inbox.PooledInbox] ends the slice.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import pykka

from actors.runtime._inbox import PooledInbox, _InboxIdle, _SliceExhausted

if TYPE_CHECKING:
    from pykka._actor import ActorInbox

__all__ = [
    "DEFAULT_POOL_NAME",
    "DEFAULT_POOL_THREADS",
    "MESSAGES_PER_SLICE",
    "ActorPool",
    "PooledActor",
]


logger = logging.getLogger(__name__)

# Most messages a pool thread handles for one actor before queueing it again
# behind the others, so a flooded actor cannot starve the rest.
MESSAGES_PER_SLICE = 100

# Threads in the process-wide pool that `ActorPool.default()` creates.
DEFAULT_POOL_THREADS = 8

# Name of the process-wide pool; its threads are "<name>-<n>".
DEFAULT_POOL_NAME = "herald-actor-pool"


class ActorPool:
    """A fixed set of daemon threads that run pooled actors' slices.

    Actors that have messages wait in one shared FIFO run queue. Each worker
    thread takes the next actor off the queue and runs one slice of it: at
    most [`MESSAGES_PER_SLICE`][actors.runtime._pool.MESSAGES_PER_SLICE]
    messages, then the actor goes to the back of the queue if it still has
    messages, or goes idle.

    The pool does not keep track of its actors: an idle actor costs no
    thread and no queue slot. Stop the actors before shutting their pool
    down; an actor that gets a message after its pool is shut down cannot run
    again and its sender gets a `RuntimeError`.

    Handlers running on a pool thread should not block for long, and in
    particular should not wait on an `ask()` to another actor of the same
    pool: with every pool thread waiting, nothing runs the actors that would
    answer.

    Args:
        threads: number of worker threads, at least one.
        name: prefix of the worker threads' names; threads are called
            `"<name>-0"`, `"<name>-1"`, and so on.
    """

    _default: ClassVar[ActorPool | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, threads: int = DEFAULT_POOL_THREADS, name: str = DEFAULT_POOL_NAME) -> None:
        if threads < 1:
            msg = f"an actor pool needs at least one thread, not {threads}"
            raise ValueError(msg)
        self.name = name
        # None is the stop signal for one worker.
        self._run_queue: queue.SimpleQueue[PooledActor | None] = queue.SimpleQueue()
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        state = "shut down" if self._is_shut_down else "running"
        return f"<ActorPool {self.name!r} threads={self.size} queued={self.queued} {state}>"

    @classmethod
    def default(cls) -> ActorPool:
        """Return the process-wide pool, creating it on first use.

        It has [`DEFAULT_POOL_THREADS`][actors.runtime._pool.DEFAULT_POOL_THREADS]
        threads named `"herald-actor-pool-<n>"`. If it has been shut down, a
        new one is created.
        """
        with cls._default_lock:
            if cls._default is None or cls._default.is_shut_down:
                cls._default = cls(DEFAULT_POOL_THREADS, DEFAULT_POOL_NAME)
            return cls._default

    @property
    def size(self) -> int:
        """Number of worker threads."""
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Approximate number of actors waiting for a pool thread (for metrics).

        Actors being run at this moment are not counted.
        """
        return self._run_queue.qsize()

    @property
    def is_shut_down(self) -> bool:
        """Whether [`shutdown()`][actors.runtime.ActorPool.shutdown] was called."""
        return self._is_shut_down

    def submit(self, actor: PooledActor) -> None:
        """Queue one slice of `actor` to run on a pool thread.

        Called by the actor's inbox on the sender's thread when a message
        arrives for an idle actor, and by a pool thread when a slice ends
        with messages left. The caller must hold the actor's run token.

        Raises:
            RuntimeError: if the pool has been shut down.
        """
        if self._is_shut_down:
            msg = f"{self!r} cannot run {actor}"
            raise RuntimeError(msg)
        self._run_queue.put(actor)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the worker threads.

        Slices already queued still run; after that the threads exit. New
        submissions are refused. Calling it again does nothing.

        Args:
            wait: wait for the threads to exit (not for the calling thread
                itself if it is one of the pool's).
        """
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
            for _ in self._threads:
                self._run_queue.put(None)
        if wait:
            current = threading.current_thread()
            for thread in self._threads:
                if thread is not current:
                    thread.join()

    def _work(self) -> None:
        """Run slices until told to stop. Runs on each worker thread."""
        while True:
            actor = self._run_queue.get()
            if actor is None:
                return
            try:
                actor._run_slice()
            except Exception:
                # _run_slice() handles the actor's own errors; this is a last
                # resort so one broken actor cannot take a worker with it.
                logger.exception("Unexpected error while running %s", actor)
            # Otherwise the worker keeps the last actor alive while it waits.
            del actor


class PooledActor(pykka.Actor):
    """A Pykka actor that runs on a shared [`ActorPool`][actors.runtime.ActorPool].

    Use it like `pykka.ThreadingActor`: subclass it, implement
    `on_receive()` or methods for proxies, and call `start()`. Messages,
    replies, `on_start()`, `on_stop()`, `on_failure()` and `stop()` behave as
    in Pykka, because the receive loop *is* Pykka's; only the thread running
    it changes:

    - `__init__()` runs on the thread calling `start()`;
    - `on_start()`, message handlers, `on_stop()` and `on_failure()` run on a
      pool thread; consecutive slices of one actor may run on different pool
      threads, but never on two at once, and messages are handled in the
      order they were put in the inbox;
    - an idle actor holds no thread at all.

    Futures are `pykka.ThreadingFuture`, so threads outside the pool wait on
    `ask()` as usual. A handler must not block its pool thread waiting for
    another actor of the same pool (see [`ActorPool`][actors.runtime.ActorPool]).

    An actor is kept alive by its `ActorRef`s (through the inbox); an idle
    actor that nobody refers to any more is garbage-collected without
    `on_stop()`, as it can never receive a message again.
    """

    register_in_registry: ClassVar[bool] = False
    """Whether `start()` registers the actor in `pykka.ActorRegistry`.

    Off by default: the registry is a list scanned on every unregister, which
    makes stopping a hundred thousand registered actors take minutes. Set it
    to `True` on a subclass whose few actors should be found through the
    registry or stopped by `ActorRegistry.stop_all()`.
    """

    actor_pool: ClassVar[ActorPool | None] = None
    """The pool the actor runs on; `None` means `ActorPool.default()`.

    Read once, when the actor starts.
    """

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Self]:
        """Start an actor on its pool and return its ref.

        Works as `pykka.Actor.start()`: arguments go to the constructor, which
        runs on the calling thread; the first slice (`on_start()`, then any
        messages) is queued on the pool. The actor is registered in
        `pykka.ActorRegistry` only if
        [`register_in_registry`][actors.runtime.PooledActor.register_in_registry]
        is set.
        """
        if cls.register_in_registry:
            return super().start(*args, **kwargs)
        obj = cls(*args, **kwargs)
        assert obj.actor_ref is not None, (
            "Actor.__init__() has not been called. Did you forget to call super() in your override?"
        )
        logger.debug("Starting %s", obj)
        obj._start_actor_loop()
        return obj.actor_ref

    @staticmethod
    def _create_actor_inbox() -> ActorInbox:
        return PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        """Bind the inbox to the pool and queue the first slice.

        Runs on the thread calling `start()`, which holds the inbox's run
        token since the inbox was made.
        """
        pool = type(self).actor_pool or ActorPool.default()
        inbox = self._pooled_inbox
        inbox._bind(self, pool)
        self._pooled_setup_done = False
        pool.submit(self)

    @property
    def _pooled_inbox(self) -> PooledInbox:
        return cast(PooledInbox, self.actor_inbox)

    def _run_slice(self) -> None:
        """Run the actor until its inbox is empty or its slice is used up.

        Runs on a pool thread that holds the inbox's run token. The first
        slice runs `on_start()` first; the slice in which the actor stops runs
        Pykka's teardown, which answers any asks left in the inbox.
        """
        inbox = self._pooled_inbox
        inbox._begin_slice(MESSAGES_PER_SLICE)
        try:
            if not self._pooled_setup_done:
                self._pooled_setup_done = True
                self._actor_loop_setup()
            self._actor_loop_running()
        except _InboxIdle:
            # The run token is gone: another thread may already be running
            # this actor, so nothing here may touch it again.
            return
        except _SliceExhausted:
            self._requeue(inbox)
            return
        except Exception:
            # Only a bug in this module gets here (Pykka's loop handles the
            # actor's exceptions); stopping the actor keeps its asks from
            # waiting forever.
            self._handle_failure(*sys.exc_info())
        self._teardown(inbox)

    def _requeue(self, inbox: PooledInbox) -> None:
        pool = inbox._pool
        assert pool is not None
        try:
            pool.submit(self)
        except RuntimeError:
            logger.warning("%s has messages left but its pool is shut down", self)

    def _teardown(self, inbox: PooledInbox) -> None:
        """Answer the asks left in the inbox and close it for good.

        Runs on the pool thread of the slice in which the actor stopped.
        """
        inbox._begin_teardown()
        try:
            self._actor_loop_teardown()
        finally:
            inbox._close()
