"""Push plans made on the consumer threads that ask for them, a group per database call.

Planning a push on the engine's loop cost an event four thread hand-offs before it
could be sent (consumer thread → PushActor → loop → database thread → loop), and under
load each hand-off waits for a core. Here the consumer thread that took the event
plans it itself, then hands the engine a push that is ready to go.

Asking threads group themselves as a database commit log does. The first to ask while
no group is in the database leads: it plans every event waiting (its own among them)
in one call, hands each asker its plans, and passes the lead to the first thread that
asked meanwhile. So a group grows with the load, one call is in the database at a
time (as with the engine's own batching, which keeps PostgreSQL's share small), and no
asker waits for more than the group ahead of it.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable, Sequence
from typing import Any

from delivery.outcomes import TransientDeliveryError
from models import DATABASE_UNAVAILABLE

# The most events one group plans (one statement) unless one request alone has more,
# as in the engine's own batches.
GROUP_MAX = 500


class _Request:
    """One thread's events, and what became of them."""

    __slots__ = ("_done", "error", "events", "leads", "results")

    def __init__(self, events: Sequence[Any]) -> None:
        self.events = events
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        # Set when this request's thread takes the lead, or is handed it.
        self.leads = False
        # Held until the request is answered or handed the lead.
        self._done = _thread.allocate_lock()
        self._done.acquire()

    def release(self) -> None:
        self._done.release()

    def wait(self) -> None:
        self._done.acquire()

    def outcome(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        assert self.results is not None
        return self.results


class GroupPlanner:
    """Runs `plan` for many threads' events at once, on the thread that leads.

    Parameters:
      plan: takes a list of events and returns one result per event (`plan_pushes`).
      connection: runs `plan` on a database connection the calling thread may use.

    `__call__` runs on a consumer thread and blocks until its events are planned. A
    group that fails is planned again one request at a time, so one bad event fails
    alone (not when the database was out of reach: then every request fails with it).
    """

    def __init__(
        self,
        plan: Callable[[list[Any]], list[Any]],
        connection: Callable[..., Any],
    ) -> None:
        self._plan = plan
        self._connection = connection
        self._mutex = threading.Lock()
        self._waiting: list[_Request] = []
        self._leading = False

    def __call__(self, events: Sequence[Any]) -> list[Any]:
        request = _Request(events)
        with self._mutex:
            self._waiting.append(request)
            if not self._leading:
                self._leading = request.leads = True
        try:
            if not request.leads:
                request.wait()
                if not request.leads:
                    return request.outcome()
            self._lead(request)
        except BaseException:
            # Raised into this thread (a time limit, a shutdown) while it waited in line
            # or before it formed its group: a request left in line, or a lead it holds,
            # would keep every later asker waiting.
            self._withdraw(request)
            raise
        return request.outcome()

    def _lead(self, mine: _Request) -> None:
        """Plan one group, answer its requests and pass the lead on."""
        group: list[_Request] = []
        try:
            with self._mutex:
                # This thread's request is first in line: it asked while nobody led, or
                # the lead was handed to it as the first waiting.
                taken, size = 1, len(self._waiting[0].events)
                while taken < len(self._waiting) and \
                        size + len(self._waiting[taken].events) <= GROUP_MAX:
                    size += len(self._waiting[taken].events)
                    taken += 1
                group = self._waiting[:taken]
                del self._waiting[:taken]
            self._run(group)
        except BaseException:
            # An exception raised into this thread (a time limit, a shutdown): the
            # others are answered (to try again later) rather than left waiting.
            for request in group:
                if request.results is None and request.error is None:
                    request.error = TransientDeliveryError(
                        "the thread planning this push was interrupted")
            raise
        finally:
            if group:  # else the group was never formed, and `_withdraw` passes the lead
                with self._mutex:
                    successor = self._pass_lead()
                for request in group:
                    if request is not mine:  # the others are waiting on their locks
                        request.release()
                if successor is not None:
                    successor.release()

    def _pass_lead(self) -> _Request | None:
        """Hand the lead to the first request waiting, or free it. Holds the mutex."""
        successor = self._waiting[0] if self._waiting else None
        if successor is None:
            self._leading = False
        else:
            successor.leads = True
        return successor

    def _withdraw(self, request: _Request) -> None:
        """Take an interrupted thread's request out of line, passing on a lead it holds."""
        with self._mutex:
            if request not in self._waiting:
                return  # answered in a group, or its group's lead already passed on
            self._waiting.remove(request)
            successor = self._pass_lead() if request.leads else None
        if successor is not None:
            successor.release()

    def _run(self, group: list[_Request]) -> None:
        events = [event for request in group for event in request.events]
        try:
            results = self._connection(self._plan, events)
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, DATABASE_UNAVAILABLE):
                for request in group:
                    request.error = exc
                return
            for request in group:
                self._run([request])
            return
        start = 0
        for request in group:
            end = start + len(request.events)
            request.results = results[start:end]
            start = end

