"""Each user's push work in one line, joined on the consumer's thread, served on the loop.

A piece of work takes its place in its user's line when a consumer thread takes it
from the queue, not when it reaches the push engine's loop. So a user's pushes,
removes and commands run in the order the consumer threads took them, however late
each of them reaches the loop, and the work at the head of a line may start on the
consumer's thread straight away (see `GroupPlanner`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class Place:
    """One piece of work's place in its user's line."""

    __slots__ = ("_ready", "first", "key")

    def __init__(self, key: Any, first: bool) -> None:
        self.key = key
        # Whether the line was empty when this place was taken: nothing of this user's
        # is ahead of it, so it may run at once.
        self.first = first
        # Set on the loop when the work waits for its turn; resolved by `leave`.
        self._ready: asyncio.Future[None] | None = None


class UserOrder:
    """The lines of one push engine, by key (`("user", id)`, or a key of its own).

    `join` runs on any thread; `turn` on the engine's loop; `leave` on any thread,
    exactly once per place, whether or not the work ever reached the loop. A line is
    forgotten once empty.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[Any, deque[Place]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the loop's thread before any `turn`."""
        self._loop = loop

    def join(self, key: Any) -> Place:
        with self._lock:
            line = self._lines.get(key)
            if line is None:
                place = Place(key, first=True)
                self._lines[key] = deque((place,))
            else:
                place = Place(key, first=False)
                line.append(place)
        return place

    async def turn(self, place: Place) -> None:
        """Return once every place ahead of `place` in its line has left."""
        with self._lock:
            if self._lines[place.key][0] is place:
                return
            place._ready = asyncio.get_running_loop().create_future()
        await place._ready

    def leave(self, place: Place) -> None:
        with self._lock:
            line = self._lines.get(place.key)
            if line is None or place not in line:
                return
            was_head = line[0] is place
            line.remove(place)
            if not line:
                del self._lines[place.key]
                return
            ready = line[0]._ready if was_head else None
        if ready is not None:
            self._wake(ready)

    def _wake(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            if not ready.done():
                ready.set_result(None)
        else:
            loop.call_soon_threadsafe(_resolve, ready)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lines)


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
