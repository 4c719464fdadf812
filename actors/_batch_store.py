"""The email side's database work: windows, claims, and the rows of a batch.

All rows of one user's open window share one deadline. Recording takes the user's
row lock (PostgreSQL `FOR UPDATE`; SQLite's single writer via `BEGIN IMMEDIATE`), so
two workers recording for one user at once agree on the window. A flush claims the
due rows with a lease (`claimed_by`, `claimed_until`) in one short UPDATE, so no
other worker can take them, and no write transaction is held while SMTP talks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee as pw

from events import Message as MessageData
from events import MessageEvent
from models import (
    Message,
    User,
    UserMessage,
    db,
    is_postgres,
    write_transaction,
)
from models import (
    ScheduledMessageNotificationEmail as Row,
)

# A flush's claim on its rows lasts this long; a worker that died mid-send lets go then.
CLAIM_LEASE_SECONDS = 300.0


def _pending(user_id: int, now: float) -> pw.Expression:
    return (Row.user_id == user_id) & (
        Row.claimed_by.is_null() | (Row.claimed_until < now)
    )


def record(event: MessageEvent, now: float | None = None) -> float | None:
    """Commit `event`'s row in its user's batch; return the window's deadline.

    Returns None when nothing was recorded: unknown user, bot, email off, or the
    message already read or deleted. Redelivery of the same event is a no-op that
    returns the existing deadline.
    """
    now = time.time() if now is None else now
    with write_transaction():
        query = User.select().where(User.id == event.user_id)
        if is_postgres():
            query = query.for_update()
        user = query.first()
        if user is None or user.is_bot or not user.enable_offline_email_notifications:
            return None
        message = event.message
        data = message.model_dump_json()
        Message.insert(id=message.id, data=data).on_conflict(
            conflict_target=[Message.id], update={Message.data: data}
        ).execute()
        UserMessage.insert(user_id=user.id, message_id=message.id).on_conflict_ignore().execute()
        flags = UserMessage.get(
            (UserMessage.user_id == user.id) & (UserMessage.message_id == message.id)
        )
        if flags.read or Message.get_by_id(message.id).deleted:
            return None
        existing = Row.get_or_none((Row.user_id == user.id) & (Row.message_id == message.id))
        if existing is not None:
            return float(existing.scheduled_timestamp)
        open_window = (
            Row.select(pw.fn.MIN(Row.scheduled_timestamp)).where(_pending(user.id, now)).scalar()
        )
        deadline = (
            float(open_window)
            if open_window is not None
            else now + user.email_batching_period_seconds
        )
        Row.insert(
            user_id=user.id,
            message_id=message.id,
            trigger=event.trigger,
            mentioned_user_group_id=event.mentioned_user_group_id,
            mentioned_user_group_name=event.mentioned_user_group_name,
            scheduled_timestamp=deadline,
        ).on_conflict_ignore().execute()
        return deadline


def next_wakeup(user_id: int, now: float | None = None) -> float | None:
    """When this user's actor should look again: the open window's deadline, or the
    end of another worker's lease on claimed rows; None when nothing is pending."""
    now = time.time() if now is None else now
    deadline = Row.select(pw.fn.MIN(Row.scheduled_timestamp)).where(_pending(user_id, now)).scalar()
    lease = (
        Row.select(pw.fn.MIN(Row.claimed_until))
        .where((Row.user_id == user_id) & (Row.claimed_until >= now))
        .scalar()
    )
    times = [float(t) for t in (deadline, lease) if t is not None]
    return min(times) if times else None


def claim_due(user_id: int, claim_id: str, now: float | None = None) -> list[Row]:
    """Claim the user's due rows for one flush; only one claimer can win each row."""
    now = time.time() if now is None else now
    with write_transaction():
        if is_postgres():
            # `record` holds this lock while it picks the window and inserts: without
            # it, a row another worker is adding to the window right now would miss
            # this claim and go out as a second email for the same window.
            User.select(User.id).where(User.id == user_id).for_update().execute()
        Row.update(claimed_by=claim_id, claimed_until=now + CLAIM_LEASE_SECONDS).where(
            _pending(user_id, now) & (Row.scheduled_timestamp <= now)
        ).execute()
    return list(Row.select().where(Row.claimed_by == claim_id).order_by(Row.message_id))


@dataclass(frozen=True)
class Batch:
    """A claimed batch, ready to render."""

    user: User | None
    rows: list[Row]
    messages: dict[int, MessageData]


def load_batch(rows: list[Row]) -> Batch:
    """Load the user and the messages of claimed rows, dropping read or deleted ones."""
    if not rows:
        return Batch(None, [], {})
    user = User.get_or_none(User.id == rows[0].user_id)
    ids = [r.message_id for r in rows]
    read = {
        um.message_id
        for um in UserMessage.select(UserMessage.message_id).where(
            (UserMessage.user_id == rows[0].user_id)
            & UserMessage.message_id.in_(ids)
            & (UserMessage.read == True)  # noqa: E712 - peewee expression
        )
    }
    messages: dict[int, MessageData] = {}
    for m in Message.select().where(Message.id.in_(ids)):
        if not m.deleted and m.id not in read and m.data != "{}":
            messages[m.id] = MessageData.model_validate_json(m.data)
    gone = [r for r in rows if r.message_id not in messages]
    if gone:
        Row.delete().where(Row.id.in_([r.id for r in gone])).execute()
    return Batch(user, [r for r in rows if r.message_id in messages], messages)


def finish(claim_id: str, message_ids: list[int]) -> None:
    """The emails for these rows went out: delete them."""
    Row.delete().where((Row.claimed_by == claim_id) & Row.message_id.in_(message_ids)).execute()


def retry_later(
    claim_id: str, message_ids: list[int], delay_for: Callable[[int], float]
) -> int:
    """Count a failed try on claimed rows and hand them back, due after
    `delay_for(tries)` seconds; returns the tries so far."""
    mine = (Row.claimed_by == claim_id) & Row.message_id.in_(message_ids)
    # Read, then write: on SQLite a deferred transaction could not upgrade to a writer
    # once another connection has written ("database is locked", at once, no waiting).
    with write_transaction():
        tries = int(Row.select(pw.fn.MAX(Row.attempts)).where(mine).scalar() or 0) + 1
        Row.update(
            claimed_by=None, claimed_until=None, attempts=tries,
            scheduled_timestamp=time.time() + delay_for(tries),
        ).where(mine).execute()
    return tries


def drop_read(user_id: int, message_ids: list[int]) -> int:
    """`read`: mark read and take the messages out of the user's pending batch."""
    with db.atomic():
        rows = [{"user_id": user_id, "message_id": m, "read": True} for m in message_ids]
        for chunk in pw.chunked(rows, 500):
            UserMessage.insert_many(chunk).on_conflict(
                conflict_target=[UserMessage.user_id, UserMessage.message_id],
                update={UserMessage.read: True},
            ).execute()
        return int(
            Row.delete()
            .where((Row.user_id == user_id) & Row.message_id.in_(message_ids)
                   & Row.claimed_by.is_null())
            .execute()
        )


def drop_deleted(message_ids: list[int]) -> list[int]:
    """`message_deleted`: mark deleted, take them out of every batch; return the users."""
    with db.atomic():
        for mid in message_ids:
            Message.insert(id=mid, data="{}", deleted=True).on_conflict(
                conflict_target=[Message.id], update={Message.deleted: True}
            ).execute()
        users = sorted(
            {r.user_id for r in Row.select(Row.user_id).where(Row.message_id.in_(message_ids))}
        )
        Row.delete().where(Row.message_id.in_(message_ids) & Row.claimed_by.is_null()).execute()
    return users


def pending_users(now: float | None = None) -> list[tuple[int, float]]:
    """Every user with pending rows and their earliest deadline (for re-arming)."""
    now = time.time() if now is None else now
    query = (
        Row.select(Row.user_id, pw.fn.MIN(Row.scheduled_timestamp).alias("deadline"))
        .where(Row.claimed_by.is_null() | (Row.claimed_until < now))
        .group_by(Row.user_id)
        .tuples()
    )
    return [(int(row[0]), float(row[1])) for row in query]  # type: ignore[index]


def rows_as_payload(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            "message_id": r.message_id,
            "trigger": r.trigger,
            "mentioned_user_group_id": r.mentioned_user_group_id,
            "mentioned_user_group_name": r.mentioned_user_group_name,
        }
        for r in rows
    ]


def restore_rows(user_id: int, rows: list[dict[str, Any]], at: float) -> None:
    """Replay of a dead-lettered batch: put its rows back, due at `at`."""
    with db.atomic():
        for r in rows:
            Row.insert(
                user_id=user_id, message_id=r["message_id"], trigger=r["trigger"],
                mentioned_user_group_id=r.get("mentioned_user_group_id"),
                mentioned_user_group_name=r.get("mentioned_user_group_name"),
                scheduled_timestamp=at,
            ).on_conflict_ignore().execute()


def shift_window(user_id: int, delta_seconds: float) -> int:
    """A user's batching period changed: move the open window's deadline by the change."""
    return int(
        Row.update(scheduled_timestamp=Row.scheduled_timestamp + delta_seconds)
        .where((Row.user_id == user_id) & Row.claimed_by.is_null())
        .execute()
    )
