"""One thread serving queued requests in groups: the shape of group commit.

Any thread `put`s a request; the group thread takes everything queued at that moment
(up to `limit`) and hands it to `serve` as one group. There is no delay of its own: at
low load a group is one request; under load, requests gather while the previous group
is being served. `EmailRecorder` (intake) and `BatchClaimer` (flushes) are built on it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# How long `stop()` waits for the thread to serve what is queued (seconds).
STOP_WAIT_SECONDS = 30.0

_STOP = object()


class GroupThread(Generic[T]):
    """A thread that serves its queue in groups; subclasses implement `serve`.

    Parameters:
      name: the thread's name.
      limit: the most requests one group takes.
    """

    def __init__(self, name: str, limit: int) -> None:
        self._limit = limit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Serve what is queued, then end the thread (called once, at shutdown)."""
        self._queue.put(_STOP)
        self._thread.join(STOP_WAIT_SECONDS)

    def put(self, request: T) -> None:
        """Queue `request` for the next group (any thread)."""
        self._queue.put(request)

    def serve(self, group: list[T]) -> list[T]:
        """Serve one group (on the group thread); return requests that must wait for
        the next group instead."""
        raise NotImplementedError

    def _run(self) -> None:
        carried: list[T] = []
        stopping = False
        while True:
            group = carried
            # Block for a first request only when nothing is carried over.
            block = not group
            while len(group) < self._limit and not stopping:
                try:
                    request = self._queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if request is _STOP:
                    stopping = True
                else:
                    group.append(request)
            if not group:
                return  # stopping, and everything before the stop was served
            carried = self.serve(group)
