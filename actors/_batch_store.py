"""The email side's database work: windows, claims, and the rows of a batch.

All rows of one user's open window share one deadline. Recording takes the user's
row lock (PostgreSQL `FOR UPDATE`; SQLite's single writer via `BEGIN IMMEDIATE`), so
two workers recording for one user at once agree on the window. A flush claims the
due rows with a lease (`claimed_by`, `claimed_until`) in one short UPDATE, so no
other worker can take them, and no write transaction is held while SMTP talks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import peewee as pw
from pydantic import ValidationError

from actors import _sql as sql
from events import Message as MessageData
from events import MessageEvent
from intake import dead_letters
from models import (
    Message,
    User,
    UserMessage,
    db,
    write_transaction,
)
from models import (
    ScheduledMessageNotificationEmail as Row,
)

logger = logging.getLogger("herald.email")

# A flush's claim on its rows lasts this long; a worker that died mid-send lets go then.
CLAIM_LEASE_SECONDS = 300.0
_USER = sql.quoted(User)
_MESSAGE = sql.quoted(Message)
_USER_MESSAGE = sql.quoted(UserMessage)
_ROW = sql.quoted(Row)


def record_many(events: Sequence[MessageEvent], now: float | None = None) -> list[float | None]:
    """Add each event's row to its user's batch, in one transaction the caller holds;
    return each event's window deadline, in order.

    An event gets None when nothing was recorded: unknown user, bot, email off, or the
    message already read or deleted. Redelivery of an event is a no-op that returns the
    existing row's deadline. Set-based: eight statements for the whole group, whatever
    its size, which is what lets intake keep up with the queue.
    """
    now = time.time() if now is None else now
    # Locked in id order, so two workers' groups never deadlock on each other;
    # `claim_batches` takes the same locks (see there).
    periods = {
        uid: float(period) for uid, bot, email_on, period in sql.rows(
            "SELECT id, is_bot, enable_offline_email_notifications, "
            f"email_batching_period_seconds FROM {_USER} WHERE {sql.any_of('id')} "
            f"ORDER BY id{sql.for_update()}",
            [sql.ids({e.user_id for e in events})],
        )
        if not bot and email_on
    }
    wanted = [e for e in events if e.user_id in periods]
    results: list[float | None] = [None] * len(events)
    if not wanted:
        return results
    message_ids = sql.ids(sorted({e.message.id for e in wanted}))
    wanted_users = sql.ids(sorted({e.user_id for e in wanted}))
    sql.store_messages(wanted, now)
    read = set(sql.rows(
        f"SELECT user_id, message_id FROM {_USER_MESSAGE} WHERE {sql.any_of('user_id')} "
        f"AND {sql.any_of('message_id')} AND read = TRUE",
        [wanted_users, message_ids],
    ))
    deleted = {mid for (mid,) in sql.rows(
        f"SELECT id FROM {_MESSAGE} WHERE {sql.any_of('id')} AND deleted = TRUE",
        [message_ids],
    )}
    existing: dict[tuple[int, int], float] = {
        (uid, mid): float(at) for uid, mid, at in sql.rows(
            f"SELECT user_id, message_id, scheduled_timestamp FROM {_ROW} "
            f"WHERE {sql.any_of('user_id')} AND {sql.any_of('message_id')}",
            [wanted_users, message_ids],
        )
    }
    p = sql.param()
    windows: dict[int, float] = {
        uid: float(at) for uid, at in sql.rows(
            f"SELECT user_id, MIN(scheduled_timestamp) FROM {_ROW} "
            f"WHERE {sql.any_of('user_id')} "
            f"AND (claimed_by IS NULL OR claimed_until < {p}) GROUP BY user_id",
            [wanted_users, now],
        )
    }
    new_rows: list[tuple[Any, ...]] = []
    index = {id(e): i for i, e in enumerate(events)}
    for event in wanted:
        key = (event.user_id, event.message.id)
        if key in read or event.message.id in deleted:
            continue
        if key in existing:
            results[index[id(event)]] = existing[key]
            continue
        # The first message opens the window; later ones join it without moving it.
        deadline = windows.setdefault(event.user_id, now + periods[event.user_id])
        existing[key] = deadline
        results[index[id(event)]] = deadline
        new_rows.append((event.user_id, event.message.id, event.trigger,
                         event.mentioned_user_group_id, event.mentioned_user_group_name,
                         deadline, 0, now))
    sql.insert(
        f"INSERT INTO {_ROW} (user_id, message_id, trigger, mentioned_user_group_id, "
        "mentioned_user_group_name, scheduled_timestamp, attempts, created_at)",
        new_rows,
        "ON CONFLICT (user_id, message_id) DO NOTHING",
    )
    return results


def next_wakeup(user_id: int, now: float | None = None) -> float | None:
    """When this user's actor should look again: the open window's deadline, or the
    end of another worker's lease on claimed rows; None when nothing is pending."""
    return next_wakeups([user_id], now).get(user_id)


def next_wakeups(users: Sequence[int], now: float | None = None) -> dict[int, float | None]:
    """`next_wakeup` for each of `users`, in one query."""
    now = time.time() if now is None else now
    p = sql.param()
    found = sql.rows(
        "SELECT user_id, MIN(CASE WHEN claimed_by IS NULL OR claimed_until < "
        f"{p} THEN scheduled_timestamp END), MIN(CASE WHEN claimed_until >= {p} "
        f"THEN claimed_until END) FROM {_ROW} WHERE {sql.any_of('user_id')} GROUP BY user_id",
        [now, now, sql.ids(users)],
    )
    wakeups: dict[int, float | None] = dict.fromkeys(users)
    for user_id, deadline, lease in found:
        times = [float(t) for t in (deadline, lease) if t is not None]
        wakeups[int(user_id)] = min(times) if times else None
    return wakeups


@dataclass(frozen=True)
class ClaimedRow:
    """One claimed row of a batch."""

    id: int
    user_id: int
    message_id: int
    trigger: str
    mentioned_user_group_id: int | None
    mentioned_user_group_name: str | None


@dataclass(frozen=True)
class BatchUser:
    """What rendering and the send decision need of the user."""

    id: int
    email: str
    full_name: str
    realm_name: str
    realm_url: str
    enable_offline_email_notifications: bool


@dataclass(frozen=True)
class Batch:
    """A claimed batch, ready to render.

    Parameters:
      claim_id: the claim on its rows.
      user: None when the user is gone.
      rows: the claimed rows whose messages are still unread and not deleted.
      messages: those messages, by id.
    """

    claim_id: str
    user: BatchUser | None
    rows: list[ClaimedRow]
    messages: dict[int, MessageData]


def claim_id_for(group_id: str, user_id: int) -> str:
    """The claim a group claim puts on one user's rows (what `claim_batches` writes)."""
    return f"{group_id}:{user_id}"


def claim_batches(
    users: Sequence[int], forced: Collection[int], group_id: str, now: float | None = None
) -> tuple[dict[int, Batch], dict[int, float | None]]:
    """Claim the due rows of each of `users` for one flush (only one claimer can win
    each row) and load what rendering needs, dropping messages read or deleted
    meanwhile. The rows of users in `forced` are due now, whatever their deadline.

    Returns the batches of users who had rows due, and for the others their next
    wake-up (see `next_wakeup`). Each user's claim id is `claim_id_for(group_id, user)`.
    Set-based: one short write transaction and a few reads for the whole group.
    """
    now = time.time() if now is None else now
    p = sql.param()
    user_ids = sql.ids(sorted(set(users)))
    with write_transaction():
        # `record_many` holds these locks while it picks a window and inserts: without
        # them, a row another worker is adding to the window right now would miss this
        # claim and go out as a second email for the same window. Id order, as there.
        sql.rows(
            f"SELECT id FROM {_USER} WHERE {sql.any_of('id')} ORDER BY id{sql.for_update()}",
            [user_ids],
        )
        if forced:
            sql.execute(
                f"UPDATE {_ROW} SET scheduled_timestamp = {p} WHERE {sql.any_of('user_id')} "
                f"AND claimed_by IS NULL AND scheduled_timestamp > {p}",
                [now, sql.ids(forced), now],
            )
        sql.execute(
            f"UPDATE {_ROW} SET claimed_by = {p} || ':' || user_id, claimed_until = {p} "
            f"WHERE {sql.any_of('user_id')} AND (claimed_by IS NULL OR claimed_until < {p}) "
            f"AND scheduled_timestamp <= {p}",
            [group_id, now + CLAIM_LEASE_SECONDS, user_ids, now, now],
        )
    rows = [ClaimedRow(*r) for r in sql.rows(
        "SELECT id, user_id, message_id, trigger, mentioned_user_group_id, "
        f"mentioned_user_group_name FROM {_ROW} WHERE {sql.any_of('user_id')} "
        f"AND claimed_by = {p} || ':' || user_id ORDER BY user_id, message_id",
        [user_ids, group_id],
    )]
    by_user: dict[int, list[ClaimedRow]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    idle = [u for u in users if u not in by_user]
    wakeups = next_wakeups(idle, now) if idle else {}
    if not by_user:
        return {}, wakeups
    claimed_users = sql.ids(sorted(by_user))
    message_ids = sql.ids(sorted({r.message_id for r in rows}))
    profiles = {
        int(uid): BatchUser(int(uid), email, full_name, realm_name, realm_url, bool(on))
        for uid, email, full_name, realm_name, realm_url, on in sql.rows(
            "SELECT id, email, full_name, realm_name, realm_url, "
            f"enable_offline_email_notifications FROM {_USER} WHERE {sql.any_of('id')}",
            [claimed_users],
        )
    }
    read = set(sql.rows(
        f"SELECT user_id, message_id FROM {_USER_MESSAGE} WHERE {sql.any_of('user_id')} "
        f"AND {sql.any_of('message_id')} AND read = TRUE", [claimed_users, message_ids],
    ))
    messages: dict[int, MessageData] = {}
    unreadable: dict[int, str] = {}
    for mid, data, deleted in sql.rows(
        f"SELECT id, data, deleted FROM {_MESSAGE} WHERE {sql.any_of('id')}", [message_ids],
    ):
        if deleted or data == "{}":
            continue
        try:
            messages[mid] = MessageData.model_validate_json(data)
        except ValidationError as exc:
            # Written by another version, or by hand: one such snapshot must not stop
            # the whole group's emails, nor come back every lease. Its rows go to the
            # dead letters below.
            unreadable[mid] = _first_error(exc)
    batches: dict[int, Batch] = {}
    gone: list[int] = []
    dead: list[tuple[int, list[ClaimedRow]]] = []
    for user_id, claimed in by_user.items():
        kept = [r for r in claimed
                if r.message_id in messages and (user_id, r.message_id) not in read]
        kept_ids = {r.id for r in kept}
        gone.extend(r.id for r in claimed if r.id not in kept_ids)
        bad = [r for r in claimed
               if r.message_id in unreadable and (user_id, r.message_id) not in read]
        if bad:
            dead.append((user_id, bad))
        batches[user_id] = Batch(
            claim_id_for(group_id, user_id), profiles.get(user_id), kept,
            {r.message_id: messages[r.message_id] for r in kept},
        )
    if gone:
        with db.atomic():
            for user_id, bad in dead:
                dead_letters.record(
                    kind=dead_letters.KIND_EMAIL_BATCH,
                    reason="; ".join(f"message {r.message_id}: stored snapshot cannot be "
                                     f"read: {unreadable[r.message_id]}" for r in bad),
                    payload={"user_id": user_id, "rows": rows_as_payload(bad)},
                    attempts=1, user_id=user_id,
                )
            sql.execute(f"DELETE FROM {_ROW} WHERE {sql.any_of('id')}", [sql.ids(gone)])
    return batches, wakeups


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


@dataclass(frozen=True)
class Unsent:
    """Rows of a claim whose email did not go out, and why."""

    message_ids: list[int]
    reason: str
    # True: worth trying again later (a 4xx reply, a timeout); False: never (a 5xx).
    transient: bool


@dataclass(frozen=True)
class Settlement:
    """How one claim's flush ended: the rows whose email went out (None: every row
    the claim holds, sent or dropped), and those whose email did not. Rows it names
    in neither stay claimed until the lease ends."""

    claim_id: str
    user_id: int
    sent: list[int] | None
    unsent: Sequence[Unsent] = ()


@dataclass(frozen=True)
class RetryPolicy:
    """How often a batch's email is tried, and how long it waits between tries.

    Parameters:
      max_tries: tries before the rows are dead-lettered.
      delay_for: seconds to wait after `tries` failed tries.
    """

    max_tries: int
    delay_for: Callable[[int], float]


def settle(
    settlements: Sequence[Settlement], users: Sequence[int], policy: RetryPolicy,
    now: float | None = None,
) -> dict[int, float | None]:
    """Record how many claims' flushes ended, in one transaction, and return the next
    wake-up of each of `users`.

    Sent rows are deleted. Rows whose email failed for a reason worth another try are
    handed back, due after the policy's delay, until their tries run out; those rows,
    and rows refused for good, move to the dead-letter store with the reason. All or
    nothing: a flush whose settle fails (the database went away) asks again with the
    same settlement, and nothing is recorded twice.
    """
    whole = [s.claim_id for s in settlements if s.sent is None and not s.unsent]
    rest = [s for s in settlements if s.sent is not None or s.unsent]
    if whole or rest:
        # Reads the tries so far, then writes (see `write_transaction`).
        with write_transaction():
            if whole:
                sql.execute(f"DELETE FROM {_ROW} WHERE {sql.any_of('claimed_by')}",
                            [sql.texts(whole)])
            for settlement in rest:
                _settle_partly(settlement, policy)
    return next_wakeups(users, now) if users else {}


def _settle_partly(settlement: Settlement, policy: RetryPolicy) -> None:
    claim_id, user_id = settlement.claim_id, settlement.user_id
    if settlement.sent:
        finish(claim_id, settlement.sent)
    for unsent in settlement.unsent:
        mine = (Row.claimed_by == claim_id) & Row.message_id.in_(unsent.message_ids)
        tries = int(Row.select(pw.fn.MAX(Row.attempts)).where(mine).scalar() or 0) + 1
        if unsent.transient and tries < policy.max_tries:
            handed_back = Row.update(
                claimed_by=None, claimed_until=None, attempts=tries,
                scheduled_timestamp=time.time() + policy.delay_for(tries),
            ).where(mine).execute()
            if handed_back:  # none: handed back already (this settle, asked again)
                logger.info("email for user %s: try %d failed, will retry: %s",
                            user_id, tries, unsent.reason[:200])
            continue
        reason = (f"gave up after {tries} tries: {unsent.reason}" if unsent.transient
                  else unsent.reason)
        rows = list(Row.select().where(mine))
        if not rows:
            continue  # settled already (this settle, asked again after it went through)
        dead_letters.record(
            kind=dead_letters.KIND_EMAIL_BATCH, reason=reason,
            payload={"user_id": user_id, "rows": rows_as_payload(rows)},
            attempts=tries, user_id=user_id,
        )
        Row.delete().where(Row.id.in_([r.id for r in rows])).execute()


def renew_claim(claim_id: str, message_ids: Sequence[int], now: float | None = None) -> bool:
    """Extend the claim's lease on these rows by `CLAIM_LEASE_SECONDS` from `now`; False
    if none of them is the claim's any more (its lease ran out and another worker's
    flush took them, or they were settled)."""
    now = time.time() if now is None else now
    with write_transaction():
        renewed = Row.update(claimed_until=now + CLAIM_LEASE_SECONDS).where(
            (Row.claimed_by == claim_id) & Row.message_id.in_(list(message_ids))
        ).execute()
    return bool(renewed)


def release(claim_ids: Sequence[str]) -> None:
    """Hand claims' rows back, pending again (their flushes will not happen)."""
    sql.execute(
        f"UPDATE {_ROW} SET claimed_by = NULL, claimed_until = NULL "
        f"WHERE {sql.any_of('claimed_by')}",
        [sql.texts(claim_ids)],
    )


def finish(claim_id: str, message_ids: list[int]) -> None:
    """The emails for these rows went out: delete them."""
    p = sql.param()
    sql.execute(
        f"DELETE FROM {_ROW} WHERE claimed_by = {p} AND {sql.any_of('message_id')}",
        [claim_id, sql.ids(message_ids)],
    )


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
        Message.mark_deleted(message_ids)
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


def rows_as_payload(rows: Sequence[Row | ClaimedRow]) -> list[dict[str, Any]]:
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
