"""Sending dead letters' work again: one letter, a list of them, or every one a filter
selects (after an outage, say).

A letter is claimed before its work is sent (its `replayed_at` is set only if it was
still unset), so two operators replaying at once never send one letter twice; if the
send fails, the claim is taken back and the letter stays as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq

from intake import dead_letters
from intake.queues import all_queues
from models import DeadLetter, db
from settings import Settings

# The kinds whose work can be sent again (a device a provider refused cannot).
REPLAYABLE_KINDS = (dead_letters.KIND_QUEUE_MESSAGE, dead_letters.KIND_EMAIL_BATCH,
                    dead_letters.KIND_KEPT_AT_STOP)


class ReplayRefused(Exception):
    """This letter's work cannot be sent again; the message says why."""


class ReplayFailed(Exception):
    """Sending this letter's work failed (the broker, most likely); the letter is as it
    was, and the letters after it are not tried."""


@dataclass(frozen=True)
class Selection:
    """Which letters `--all` replays: not yet replayed, of a replayable kind, and
    matching every filter given."""

    kind: str | None = None
    queue: str | None = None
    # Part of the reason, e.g. "timeout" or "503".
    reason: str | None = None

    def ids(self) -> list[int]:
        query = DeadLetter.select(DeadLetter.id).where(
            DeadLetter.replayed_at.is_null() & DeadLetter.kind.in_(REPLAYABLE_KINDS)
        )
        if self.kind is not None:
            query = query.where(DeadLetter.kind == self.kind)
        if self.queue is not None:
            query = query.where(DeadLetter.queue == self.queue)
        if self.reason is not None:
            query = query.where(DeadLetter.reason.contains(self.reason))
        return [row.id for row in query.order_by(DeadLetter.id)]


class Replayer:
    """Replays dead letters, oldest first, through one broker connection.

    Parameters:
      settings: `BROKER_URL` (needed for queue messages; without it, only email
        batches can be replayed, straight into the database) and `PUSH_SHARDS`.

    Runs on the caller's thread, which must have the database open; `close()` closes
    the broker connection if one was made.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._broker: dramatiq.Broker | None = None

    def check(self, letter_id: int) -> DeadLetter:
        """Letter `letter_id`, when `replay` would send its work; else raises
        `ReplayRefused` saying why. Changes nothing and connects to no broker, so a dry
        run answers as the replay itself would."""
        row = dead_letters.get_dead_letter(letter_id)
        if row is None:
            raise ReplayRefused(f"no dead letter {letter_id}")
        if row.kind not in REPLAYABLE_KINDS:
            raise ReplayRefused(f"dead letter {row.id} is of kind {row.kind}, which cannot be "
                                "replayed (the provider refused it permanently)")
        if row.replayed_at is not None:
            raise ReplayRefused(f"dead letter {row.id} was already replayed")
        if row.kind == dead_letters.KIND_EMAIL_BATCH:
            return row
        payload = json.loads(row.payload)
        if not self.settings.BROKER_URL:
            raise ReplayRefused(
                f"dead letter {row.id}: replaying a queue message needs BROKER_URL (the "
                "in-process broker lives in the running herald)" + _resubmit_advice(payload))
        shards = self.settings.PUSH_SHARDS
        queues = all_queues(shards)
        if payload["queue"] not in queues:
            # The broker would create the queue and take the message, but no worker
            # consumes it: the work would be marked replayed and never done.
            raise ReplayRefused(
                f"dead letter {row.id} is for queue {payload['queue']}, which no worker "
                f"consumes with PUSH_SHARDS={shards} (queues {', '.join(queues)}): left "
                "unreplayed" + _resubmit_advice(payload))
        return row

    def replay(self, letter_id: int) -> DeadLetter:
        """Send letter `letter_id`'s work again and mark it replayed; raises
        `ReplayRefused` (and changes nothing) when that cannot be done."""
        row = self.check(letter_id)
        payload = json.loads(row.payload)
        if row.kind == dead_letters.KIND_EMAIL_BATCH and not self.settings.BROKER_URL:
            # Embedded default: the rows go back in the same transaction as the claim;
            # the running herald's sweep picks them up.
            from actors._batch_store import restore_rows

            with db.atomic():
                self._claim(row)
                restore_rows(payload["user_id"], payload["rows"], time.time())
            return row
        self._claim(row)
        try:
            self._send(row.kind, payload)
        except BaseException as exc:
            self._unclaim(row)
            if not isinstance(exc, Exception):
                raise
            raise ReplayFailed(f"dead letter {row.id}: not sent, left as it was "
                               f"({type(exc).__name__}: {exc})") from exc
        return row

    def replay_all(self, ids: Sequence[int]) -> tuple[list[DeadLetter], list[str]]:
        """Replay each of `ids` in turn; returns the letters replayed and, for the
        others, why not. Stops at the first that could not be sent."""
        done: list[DeadLetter] = []
        problems: list[str] = []
        for position, letter_id in enumerate(ids):
            try:
                done.append(self.replay(letter_id))
            except ReplayRefused as exc:
                problems.append(str(exc))
            except ReplayFailed as exc:
                problems.append(str(exc))
                if position + 1 < len(ids):
                    problems.append(f"{len(ids) - position - 1} more not tried")
                break
        return done, problems

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        from intake.consumers import COMMAND_REPLAY_EMAIL_BATCH
        from intake.publisher import Publisher
        from intake.queues import EMAIL_ACTOR, EMAIL_QUEUE

        broker = self._connect()
        if kind == dead_letters.KIND_EMAIL_BATCH:
            Publisher(broker, self.settings.PUSH_SHARDS).command(
                EMAIL_QUEUE, EMAIL_ACTOR, COMMAND_REPLAY_EMAIL_BATCH, payload)
        else:
            broker.enqueue(dead_letters.queue_message(payload))

    def _connect(self) -> dramatiq.Broker:
        if self._broker is None:
            from intake.broker import make_broker
            from intake.consumers import Consumers

            self._broker = make_broker(self.settings)
            Consumers(self._broker, self.settings.PUSH_SHARDS)  # declares the queues
        return self._broker

    @staticmethod
    def _claim(row: DeadLetter) -> None:
        claimed = DeadLetter.update(replayed_at=time.time()).where(
            (DeadLetter.id == row.id) & DeadLetter.replayed_at.is_null()
        ).execute()
        if not claimed:
            raise ReplayRefused(f"dead letter {row.id} was already replayed")

    @staticmethod
    def _unclaim(row: DeadLetter) -> None:
        DeadLetter.update(replayed_at=None).where(DeadLetter.id == row.id).execute()


def _resubmit_advice(payload: dict[str, Any]) -> str:
    """How to send a queue message's events again through the API, which routes them
    to the queues this configuration has; nothing for an internal command, which the
    API does not take."""
    if payload.get("kwargs", {}).get("command"):
        return ""
    events = (payload.get("args") or [None])[0]
    # A push message may carry several events, as a list: the API takes a list only
    # inside {"events": [...]}.
    body = {"events": events} if isinstance(events, list) else events
    return "; POST its events to /v1/events instead:\n" + json.dumps(body, sort_keys=True)
