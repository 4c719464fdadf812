"""The push side's database work: what to send to whom, and recording what happened.

Every function runs on a database thread of a push engine, inside `in_connection`, or
(`plan_pushes`, `mark_deleted`) on a consumer thread, inside `models.in_call_connection`.
State makes delivery idempotent and order-proof: a receipt per (message, device)
means a retry resends only to devices that have not accepted (or permanently refused)
it yet; a message already read or deleted is never pushed, so a remove processed first
still wins.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee as pw

from actors import _sql as sql
from delivery.outcomes import Outcome, SendResult, TransientDeliveryError
from events import MessageEvent
from intake import dead_letters
from models import (
    Message,
    PushDevice,
    PushReceipt,
    User,
    UserMessage,
    db,
    in_thread_connection,
    is_postgres,
)
from rendering.push import Recipient

logger = logging.getLogger("herald.push")

T = TypeVar("T")

# Receipt kinds: the message push itself, and the remove that clears it.
EVENT_MESSAGE = "message"
EVENT_REMOVE = "remove"
# A remove names at most this many message ids (the newest), as Zulip's apps expect.
MAX_REMOVE_IDS = 200
# How long after its plan a push may still be on its way to its devices: a little
# longer than a consumer waits for its push (`HANDOFF_TIMEOUT_SECONDS`, 120 s) before
# the event is retried, and so planned anew.
PUSH_ON_ITS_WAY_SECONDS = 130.0

_USER = sql.quoted(User)
_MESSAGE = sql.quoted(Message)
_USER_MESSAGE = sql.quoted(UserMessage)
_DEVICE = sql.quoted(PushDevice)
_RECEIPT = sql.quoted(PushReceipt)


@dataclass(frozen=True)
class Device:
    """A device a push goes to (a `PushDevice` row, read without the model)."""

    id: int
    kind: str
    token: str
    ios_app_id: str | None


@dataclass(frozen=True)
class PushPlan:
    """Who gets a push, on which devices (those that have not accepted it yet)."""

    user_id: int
    user_uuid: str
    recipient: Recipient
    devices: list[Device]


# One device's outcome of one push or remove: (user_id, message_id, event, device, result).
Settled = tuple[int, int, str, Device, SendResult]


class PushOnItsWay(TransientDeliveryError):
    """A remove must wait: the push it removes is planned but not yet answered.

    Within one process a user's work runs in line, so this happens when another
    worker process took the push: the remove is retried (after the usual backoff)
    rather than sent ahead of the push, which the device would then show for good.
    """

    def __init__(self, message_id: int) -> None:
        super().__init__(f"the push of message {message_id} is still on its way; "
                         "its remove waits for it")


@dataclass(frozen=True)
class RemovePlan:
    user_id: int
    user_uuid: str
    recipient: Recipient
    devices: list[Device]
    message_ids: list[int]


def in_connection(fn: Callable[..., T], *args: Any) -> T:
    # The engine's database threads are few and long-lived: each keeps its connection.
    return in_thread_connection(fn, *args)


def recipient_of(user: User) -> Recipient:
    return Recipient(
        user_id=user.id,
        email=user.email,
        full_name=user.full_name,
        realm_name=user.realm_name,
        realm_url=user.realm_url,
    )


def plan_pushes(events: Sequence[MessageEvent]) -> list[PushPlan | None]:
    """Decide, for a group of events in one transaction, whether to push each and to
    which devices; marks each push active before it goes out.

    None for an event means no push: unknown user, bot, push off, message read or
    deleted already, or every device has accepted it (a retry after a full success).
    Set-based, so a group costs a handful of statements whatever its size; on
    PostgreSQL, one.
    """
    if is_postgres():
        return _plan_pushes_in_one_statement(events)
    now = time.time()
    users = {
        row[0]: row for row in sql.rows(
            "SELECT id, uuid, email, full_name, realm_name, realm_url FROM "
            f"{_USER} WHERE {sql.any_of('id')} AND is_bot = FALSE "
            "AND enable_offline_push_notifications = TRUE",
            [sql.ids({e.user_id for e in events})],
        )
    }
    wanted = [e for e in events if e.user_id in users]
    if not wanted:
        return [None] * len(events)
    user_ids = sql.ids(sorted(users))
    message_ids = sql.ids(sorted({e.message.id for e in wanted}))
    with db.atomic():
        sql.store_messages(wanted, now)
        flags = {
            (uid, mid): (row_id, bool(read), bool(active)) for row_id, uid, mid, read, active
            in sql.rows(
                f"SELECT id, user_id, message_id, read, active_push FROM {_USER_MESSAGE} "
                f"WHERE {sql.any_of('user_id')} AND {sql.any_of('message_id')}",
                [user_ids, message_ids],
            )
        }
        deleted = {mid for (mid,) in sql.rows(
            f"SELECT id FROM {_MESSAGE} WHERE {sql.any_of('id')} AND deleted = TRUE",
            [message_ids],
        )}
        live = [e for e in wanted
                if not flags[(e.user_id, e.message.id)][1] and e.message.id not in deleted]
        if live:
            p = sql.param()
            sql.execute(f"UPDATE {_USER_MESSAGE} SET active_push = TRUE, push_planned_at = {p} "
                        f"WHERE {sql.any_of('id')}",
                        [now, sql.ids(sorted({flags[(e.user_id, e.message.id)][0]
                                              for e in live}))])
    if not live:
        return [None] * len(events)
    p = sql.param()
    done = set(sql.rows(
        f"SELECT user_id, message_id, device_id FROM {_RECEIPT} WHERE "
        f"{sql.any_of('user_id')} AND {sql.any_of('message_id')} AND event = {p}",
        [user_ids, message_ids, EVENT_MESSAGE],
    ))
    devices: dict[int, list[Device]] = {}
    for device_id, uid, kind, token, app in sql.rows(
        f"SELECT id, user_id, kind, token, ios_app_id FROM {_DEVICE} "
        f"WHERE {sql.any_of('user_id')} ORDER BY id",
        [sql.ids(sorted({e.user_id for e in live}))],
    ):
        devices.setdefault(uid, []).append(Device(device_id, kind, token, app))
    plans: dict[int, PushPlan | None] = {}
    for event in live:
        user = users[event.user_id]
        todo = [d for d in devices.get(event.user_id, [])
                if (event.user_id, event.message.id, d.id) not in done]
        plans[id(event)] = PushPlan(
            user[0], user[1], Recipient(user[0], user[2], user[3], user[4], user[5]), todo
        ) if todo else None
    return [plans.get(id(e)) for e in events]


# `plan_pushes` on PostgreSQL as one statement (atomic on its own). A push waits for
# its plan, and on a busy machine each round trip to the server costs milliseconds
# of waiting for a core; the step-by-step version takes ten, with BEGIN and COMMIT.
# Same rules: the snapshot is kept (a `deleted` mark that came first stays), a flags
# row per (user, message), the push marked active unless read or deleted, and
# devices that already have a receipt skipped; `push_planned_at` stamped on every push
# planned (a retry's too), for removes taken by other processes to wait on.
_PLAN_PUSHES_PG = f"""
WITH ev AS (
    SELECT DISTINCT ON (user_id, message_id) user_id, message_id, data
    FROM unnest(%(users)s::bigint[], %(messages)s::bigint[], %(data)s::text[])
        AS e(user_id, message_id, data)
), eligible AS (
    SELECT id, uuid, email, full_name, realm_name, realm_url FROM {_USER}
    WHERE id IN (SELECT user_id FROM ev) AND is_bot = FALSE
        AND enable_offline_push_notifications = TRUE
), snapshot AS (
    INSERT INTO {_MESSAGE} (id, data, deleted, created_at)
    SELECT DISTINCT ON (message_id) message_id, data, FALSE, %(now)s FROM ev
    WHERE user_id IN (SELECT id FROM eligible)
    ORDER BY message_id
    ON CONFLICT (id) DO UPDATE SET data = excluded.data
    RETURNING id, deleted
), flags AS (
    INSERT INTO {_USER_MESSAGE} AS um (user_id, message_id, read, active_push, push_planned_at)
    SELECT ev.user_id, ev.message_id, FALSE, NOT snapshot.deleted, %(now)s
    FROM ev JOIN snapshot ON snapshot.id = ev.message_id
    WHERE ev.user_id IN (SELECT id FROM eligible)
    ORDER BY ev.user_id, ev.message_id
    ON CONFLICT (user_id, message_id) DO UPDATE SET active_push = TRUE,
        push_planned_at = excluded.push_planned_at
        WHERE NOT um.read AND excluded.active_push
    RETURNING user_id, message_id, active_push
)
SELECT flags.user_id, flags.message_id, eligible.uuid, eligible.email, eligible.full_name,
    eligible.realm_name, eligible.realm_url, device.id, device.kind, device.token,
    device.ios_app_id
FROM flags
JOIN eligible ON eligible.id = flags.user_id
JOIN {_DEVICE} AS device ON device.user_id = flags.user_id
WHERE flags.active_push AND NOT EXISTS (
    SELECT 1 FROM {_RECEIPT} AS receipt
    WHERE receipt.user_id = flags.user_id AND receipt.message_id = flags.message_id
        AND receipt.device_id = device.id AND receipt.event = '{EVENT_MESSAGE}'
)
ORDER BY device.id
"""


def _plan_pushes_in_one_statement(events: Sequence[MessageEvent]) -> list[PushPlan | None]:
    snapshots = {e.message.id: e.message.model_dump_json() for e in events}
    found = sql.rows(_PLAN_PUSHES_PG, {
        "users": [e.user_id for e in events],
        "messages": [e.message.id for e in events],
        "data": [snapshots[e.message.id] for e in events],
        "now": time.time(),
    })
    plans: dict[tuple[int, int], PushPlan] = {}
    for (uid, mid, uuid, email, full_name, realm_name, realm_url,
         device_id, kind, token, app) in found:
        plan = plans.get((uid, mid))
        if plan is None:
            plan = plans[(uid, mid)] = PushPlan(
                uid, uuid, Recipient(uid, email, full_name, realm_name, realm_url), []
            )
        plan.devices.append(Device(device_id, kind, token, app))
    return [plans.get((e.user_id, e.message.id)) for e in events]


def plan_remove(user_id: int, message_ids: list[int], mark_read: bool) -> RemovePlan | None:
    """Mark the messages read (for `read`), and plan a remove for those with a push out.

    Raises `PushOnItsWay` (after the read marks are committed, so no later plan pushes
    these messages) when a push it would remove was planned, possibly by another
    process, and a device it went to has not answered it yet.
    """
    with db.atomic():
        if mark_read:
            rows = [{"user_id": user_id, "message_id": m, "read": True} for m in message_ids]
            for chunk in pw.chunked(rows, 500):
                UserMessage.insert_many(chunk).on_conflict(
                    conflict_target=[UserMessage.user_id, UserMessage.message_id],
                    update={UserMessage.read: True},
                ).execute()
        planned: dict[int, float | None] = dict(
            UserMessage.select(UserMessage.message_id, UserMessage.push_planned_at).where(
                (UserMessage.user_id == user_id)
                & (UserMessage.message_id.in_(message_ids))
                & (UserMessage.active_push == True)  # noqa: E712 - peewee expression
            ).tuples()  # type: ignore[arg-type]  # rows of (message_id, push_planned_at)
        )
    if not planned:
        return None
    user = User.get_or_none(User.id == user_id)
    if user is None:
        return None
    newest = sorted(planned)[-MAX_REMOVE_IDS:]
    done = {
        r.device_id
        for r in PushReceipt.select(PushReceipt.device_id).where(
            (PushReceipt.user_id == user_id)
            & (PushReceipt.message_id == max(newest))
            & (PushReceipt.event == EVENT_REMOVE)
        )
    }
    devices = [d for d in PushDevice.select().where(PushDevice.user_id == user_id)
               .order_by(PushDevice.id)
               if d.id not in done]
    _refuse_while_pushes_on_their_way(user_id, {m: planned[m] for m in newest}, devices)
    return RemovePlan(user.id, user.uuid, recipient_of(user),
                      [Device(d.id, d.kind, d.token, d.ios_app_id) for d in devices], newest)


def _refuse_while_pushes_on_their_way(user_id: int, planned: dict[int, float | None],
                                  devices: list[PushDevice]) -> None:
    """Raise `PushOnItsWay` if a push planned lately still lacks a device's answer.

    A device's answer is its receipt (accepted, or refused for good); a transient
    failure clears `push_planned_at` when it is recorded, and an invalid device is
    deleted. A device added after the plan was not sent the push, so it is not waited
    for; nor is a plan older than `PUSH_ON_ITS_WAY_SECONDS`.
    """
    since = time.time() - PUSH_ON_ITS_WAY_SECONDS
    recent = {m: at for m, at in planned.items() if at is not None and at > since}
    if not recent or not devices:
        return
    answered = set(
        PushReceipt.select(PushReceipt.message_id, PushReceipt.device_id).where(
            (PushReceipt.user_id == user_id)
            & (PushReceipt.message_id.in_(sorted(recent)))
            & (PushReceipt.event == EVENT_MESSAGE)
        ).tuples()
    )
    for message_id, at in sorted(recent.items()):
        for device in devices:
            if device.created_at <= at and (message_id, device.id) not in answered:
                raise PushOnItsWay(message_id)


def clear_active(user_id: int, message_ids: list[int]) -> None:
    UserMessage.update(active_push=False).where(
        (UserMessage.user_id == user_id) & (UserMessage.message_id.in_(message_ids))
    ).execute()


def push_not_on_its_way(user_id: int, message_id: int) -> None:
    """The push's attempt is over without receipts (its provider failed as a whole):
    a remove need not wait for it."""
    UserMessage.update(push_planned_at=None).where(
        (UserMessage.user_id == user_id) & (UserMessage.message_id == message_id)
    ).execute()


def mark_deleted(message_ids: list[int]) -> None:
    """Mark messages deleted: no push is planned for them from now on."""
    with db.atomic():
        Message.mark_deleted(message_ids)


def pushes_out_for(message_ids: list[int], shard: int, shards: int) -> list[int]:
    """This shard's users who have a push out for any of the messages."""
    users = (
        UserMessage.select(UserMessage.user_id)
        .where(
            (UserMessage.message_id.in_(message_ids))
            & (UserMessage.active_push == True)  # noqa: E712 - peewee expression
        )
        .distinct()
    )
    # The shard filter is applied here: peewee's `%` is LIKE, not modulo.
    return sorted(u.user_id for u in users if u.user_id % shards == shard)


def record_results(settled: Sequence[Settled]) -> None:
    """Receipts for accepted sends, dead devices deleted, permanent failures
    dead-lettered, and pushes that failed for now no longer on their way (a remove
    need not wait for them): for many pushes' outcomes at once, in one transaction."""
    now = time.time()
    receipts = []
    dead_devices = set()
    failures = []
    failed_for_now = set()
    for user_id, message_id, event, device, result in settled:
        # A permanent failure is settled too: its dead letter is written below, and a
        # retry of the event (for another device's transient failure) must not send to
        # this device again.
        if result.outcome in (Outcome.DELIVERED, Outcome.PERMANENT):
            receipts.append((user_id, message_id, device.id, event, now))
        elif result.outcome is Outcome.INVALID_DEVICE:
            logger.info("deleting device %s of user %s: %s", device.id, user_id, result.reason)
            dead_devices.add(device.id)
        if result.outcome is Outcome.PERMANENT:
            failures.append((user_id, message_id, event, device, result))
        if result.outcome is Outcome.TRANSIENT and event == EVENT_MESSAGE:
            failed_for_now.add((user_id, message_id))
    if not dead_devices and not failures and not failed_for_now:
        # Receipts alone need no transaction (each insert is idempotent), and without
        # BEGIN and COMMIT the usual case is one round trip.
        _insert_receipts(receipts)
        return
    with db.atomic():
        _insert_receipts(receipts)
        if dead_devices:
            sql.execute(f"DELETE FROM {_DEVICE} WHERE {sql.any_of('id')}",
                        [sql.ids(sorted(dead_devices))])
        for user_id, message_id in sorted(failed_for_now):
            push_not_on_its_way(user_id, message_id)
        for user_id, message_id, event, device, result in failures:
            dead_letters.record(
                kind=dead_letters.KIND_PUSH_DEVICE,
                reason=f"{device.kind}: {result.reason}",
                payload={"user_id": user_id, "message_id": message_id, "event": event,
                         "device_id": device.id, "kind": device.kind},
                user_id=user_id,
                attempts=1,
            )


def _insert_receipts(receipts: list[tuple[int, int, int, str, float]]) -> None:
    sql.insert(
        f"INSERT INTO {_RECEIPT} (user_id, message_id, device_id, event, created_at)",
        sorted(set(receipts)),
        "ON CONFLICT (user_id, message_id, device_id, event) DO NOTHING",
    )


def message_payload(message_id: int) -> dict[str, Any] | None:
    row = Message.get_or_none(Message.id == message_id)
    return json.loads(row.data) if row is not None and row.data != "{}" else None
