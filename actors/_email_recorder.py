"""Group commit for the email queue: many consumers' events, one transaction.

Dramatiq worker threads hand each email event to `EmailRecorder.submit()` and wait.
One writer thread takes everything queued so far (up to `GROUP_MAX`), applies it in
arrival order inside one transaction, and only then answers the waiters, so every
acked event is in a committed row. A commit, and on PostgreSQL a WAL flush, is the
dear part of recording an event; sharing it across a group is what lets intake keep
up with the queue. Once a group is committed the writer reports which users' timers
to arm (and which to flush now) to the BatchRouter.

The writer is the only thread that writes new email rows in this process, so the
order of one user's events (a message, then its `read`) is the order they are applied.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors import _batch_store as store
from actors._group_thread import GroupThread
from events import MessageDeletedEvent, MessageEvent, ReadEvent
from models import in_thread_connection, write_transaction

logger = logging.getLogger("herald.email")

# The most events one transaction takes; bounds its locks and its statement sizes.
GROUP_MAX = 500

EmailEvent = MessageEvent | ReadEvent | MessageDeletedEvent


@dataclass
class _Item:
    event: EmailEvent
    reply: pykka.ThreadingFuture[Any] = field(default_factory=pykka.ThreadingFuture)


@dataclass(frozen=True)
class Recorded:
    """What one committed group asks of the BatchRouter.

    Parameters:
      arm: user → earliest deadline among the group's new rows.
      flush_now: users whose group held a `"flush": "now"` event.
    """

    arm: dict[int, float]
    flush_now: frozenset[int]


class EmailRecorder(GroupThread[_Item]):
    """Commits email events in groups on one writer thread.

    Parameters:
      on_recorded: called on the writer thread after each commit that added rows.
    """

    def __init__(self, on_recorded: Callable[[Recorded], None]) -> None:
        super().__init__("herald-email-recorder", GROUP_MAX)
        self._on_recorded = on_recorded

    def submit(self, event: EmailEvent) -> pykka.ThreadingFuture[Any]:
        """Queue `event`; the future resolves once it is committed (any thread)."""
        item = _Item(event)
        self.put(item)
        return item.reply

    # The writer thread ------------------------------------------------------------------

    def serve(self, group: list[_Item]) -> list[_Item]:
        self._commit(group)
        return []

    def _commit(self, group: list[_Item]) -> None:
        try:
            results = in_thread_connection(_apply_group, [i.event for i in group])
        except Exception:
            if len(group) == 1:
                group[0].reply.set_exception(sys.exc_info())  # type: ignore[arg-type]
                return
            # One event's failure must not fail its neighbours: apply them one by one.
            logger.warning("email group of %d failed; applying its events one by one",
                           len(group), exc_info=True)
            for item in group:
                self._commit([item])
            return
        self._report(group, results)
        for item in group:
            item.reply.set(None)

    def _report(self, group: list[_Item], results: list[float | None]) -> None:
        arm: dict[int, float] = {}
        flush_now: set[int] = set()
        for item, deadline in zip(group, results, strict=True):
            event = item.event
            if deadline is None or not isinstance(event, MessageEvent):
                continue
            if event.flush == "now":
                flush_now.add(event.user_id)
            arm[event.user_id] = min(deadline, arm.get(event.user_id, deadline))
        if arm:
            try:
                self._on_recorded(Recorded(arm, frozenset(flush_now)))
            except Exception:
                # The rows are committed: the router's sweep arms these users later.
                logger.exception("could not hand %d users' deadlines to the router", len(arm))


def _apply_group(events: Sequence[EmailEvent]) -> list[float | None]:
    """Apply `events` in order in one transaction; a message event's result is its
    window's deadline (None when not recorded), the others' None."""
    results: list[float | None] = []
    now = time.time()
    with write_transaction():
        run: list[MessageEvent] = []
        for event in events:
            if isinstance(event, MessageEvent):
                run.append(event)
                continue
            if run:
                results.extend(store.record_many(run, now))
                run = []
            if isinstance(event, ReadEvent):
                store.drop_read(event.user_id, event.message_ids)
            else:
                store.drop_deleted(event.message_ids)
            results.append(None)
        if run:
            results.extend(store.record_many(run, now))
    return results
