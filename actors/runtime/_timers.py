"""A shared timer service: one thread, one heap, many pending timers.

Actors on a pool must not sleep on their pool thread to wait for a deadline.
They arm a timer instead, whose callback (typically `actor_ref.tell(msg)`)
runs on the wheel's thread when the deadline comes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import ClassVar

__all__ = ["COMPACT_MIN_CANCELLED", "DEFAULT_TIMER_THREAD_NAME", "TimerHandle", "TimerWheel"]


logger = logging.getLogger(__name__)

# Cancelled entries stay in the heap until they reach its top; the heap is
# rebuilt without them once they are at least this many and half of it.
COMPACT_MIN_CANCELLED = 1024

# Name of the thread of `TimerWheel.default()`.
DEFAULT_TIMER_THREAD_NAME = "herald-timers"


class TimerHandle:
    """A pending call made by [`TimerWheel.call_at()`][actors.runtime.TimerWheel.call_at].

    Args:
        wheel: the wheel the call is pending on.
        when: the deadline, in `time.monotonic()` seconds.
        callback: the function to call, without arguments.
    """

    __slots__ = ("_callback", "_cancelled", "_wheel", "when")

    def __init__(self, wheel: TimerWheel, when: float, callback: Callable[[], object]) -> None:
        self._wheel = wheel
        self.when = when
        # None once the call has fired or been cancelled, which also frees
        # whatever the callback holds on to.
        self._callback: Callable[[], object] | None = callback
        self._cancelled = False

    def __repr__(self) -> str:
        if self._cancelled:
            state = "cancelled"
        elif self._callback is None:
            state = "done"
        else:
            state = "pending"
        return f"<TimerHandle when={self.when:.3f} {state}>"

    @property
    def cancelled(self) -> bool:
        """Whether [`cancel()`][actors.runtime.TimerHandle.cancel] stopped the call."""
        return self._cancelled

    @property
    def pending(self) -> bool:
        """Whether the call has neither fired nor been cancelled yet."""
        return self._callback is not None

    def cancel(self) -> bool:
        """Cancel the call if it has not fired yet. May run on any thread.

        A callback that the wheel's thread has already taken may still run
        after this returns `False`.

        Returns:
            `True` if the call was pending and will now never run, `False`
            if it had already fired or been cancelled.
        """
        return self._wheel._cancel(self)


class TimerWheel:
    """Runs callbacks at deadlines, on one daemon thread.

    Pending calls live in a binary heap ordered by deadline, so arming or
    cancelling one costs O(log n) at most and a hundred thousand pending
    calls cost a few tens of megabytes and no extra threads. Calls with the
    same deadline run in the order they were armed.

    Callbacks run on the wheel's thread, one after another, and must be
    quick: a slow one delays every call behind it. The usual callback sends
    a message to an actor. A callback that raises is logged and the wheel
    carries on.

    Cancelling only marks the entry; it leaves the heap when it reaches the
    top, or when cancelled entries are numerous enough for a rebuild
    ([`COMPACT_MIN_CANCELLED`][actors.runtime._timers.COMPACT_MIN_CANCELLED]).

    Args:
        name: name of the wheel's thread.
    """

    _default: ClassVar[TimerWheel | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = DEFAULT_TIMER_THREAD_NAME) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._cancelled_in_heap = 0
        self._sequence = itertools.count()
        self._condition = threading.Condition(threading.Lock())
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<TimerWheel {self._thread.name!r} pending={len(self)} {state}>"

    @classmethod
    def default(cls) -> TimerWheel:
        """Return the process-wide wheel, creating it on first use.

        If it has been stopped, a new one is created.
        """
        with cls._default_lock:
            if cls._default is None or cls._default.is_stopped:
                cls._default = cls(DEFAULT_TIMER_THREAD_NAME)
            return cls._default

    @property
    def is_stopped(self) -> bool:
        """Whether [`stop()`][actors.runtime.TimerWheel.stop] was called."""
        return self._stopped

    def __len__(self) -> int:
        """Number of calls that have neither fired nor been cancelled."""
        with self._condition:
            return len(self._heap) - self._cancelled_in_heap

    @property
    def pending(self) -> int:
        """Same as `len(wheel)`, for metrics."""
        return len(self)

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        """Call `callback()` on the wheel's thread at `when`. May run on any thread.

        Args:
            when: the deadline, in `time.monotonic()` seconds; a deadline in
                the past fires as soon as possible.
            callback: the function to call, without arguments.

        Raises:
            RuntimeError: if the wheel has been stopped.
        """
        handle = TimerHandle(self, when, callback)
        with self._condition:
            if self._stopped:
                msg = f"timer wheel {self._thread.name!r} is stopped"
                raise RuntimeError(msg)
            heapq.heappush(self._heap, (when, next(self._sequence), handle))
            if self._heap[0][2] is handle:
                # The thread sleeps until the old earliest deadline.
                self._condition.notify()
        return handle

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Call `callback()` on the wheel's thread `delay` seconds from now.

        See [`call_at()`][actors.runtime.TimerWheel.call_at].
        """
        return self.call_at(time.monotonic() + delay, callback)

    def stop(self, wait: bool = True) -> None:
        """Stop the thread and drop all pending calls. Calling it again does nothing.

        A callback already running finishes.

        Args:
            wait: wait for the thread to exit (unless called from a callback).
        """
        with self._condition:
            self._stopped = True
            for _, _, handle in self._heap:
                handle._callback = None
            self._heap.clear()
            self._cancelled_in_heap = 0
            self._condition.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _cancel(self, handle: TimerHandle) -> bool:
        with self._condition:
            if handle._callback is None:
                return False
            handle._callback = None
            handle._cancelled = True
            self._cancelled_in_heap += 1
            if (
                self._cancelled_in_heap >= COMPACT_MIN_CANCELLED
                and 2 * self._cancelled_in_heap >= len(self._heap)
            ):
                self._compact()
            # The earliest deadline may now be later, but waking the thread
            # for that is not worth it: it pops the entry when it wakes.
            return True

    def _compact(self) -> None:
        """Rebuild the heap without cancelled entries. Caller holds the lock."""
        self._heap = [entry for entry in self._heap if entry[2]._callback is not None]
        heapq.heapify(self._heap)
        self._cancelled_in_heap = 0

    def _run(self) -> None:
        """Fire calls as their deadlines pass. Runs on the wheel's thread."""
        while True:
            callback = self._next_due()
            if callback is None:
                return
            try:
                callback()
            except Exception:
                logger.exception("Timer callback %r failed", callback)
            # Drop the reference before sleeping so the callback's closure
            # can be freed.
            del callback

    def _next_due(self) -> Callable[[], object] | None:
        """Wait for the earliest pending call to be due and take it.

        Returns `None` once the wheel is stopped.
        """
        with self._condition:
            while not self._stopped:
                if not self._heap:
                    self._condition.wait()
                    continue
                when, _, handle = self._heap[0]
                if handle._callback is None:
                    heapq.heappop(self._heap)
                    self._cancelled_in_heap -= 1
                    continue
                delay = when - time.monotonic()
                if delay > 0:
                    self._condition.wait(delay)
                    continue
                heapq.heappop(self._heap)
                callback = handle._callback
                handle._callback = None
                return callback
            return None
