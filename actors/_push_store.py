"""The push side's database work: what to send to whom, and recording what happened.

Every function runs on a database thread of a push engine, inside `in_connection`.
State makes delivery idempotent and order-proof: a receipt per (message, device)
means a retry resends only to devices that have not accepted (or permanently refused)
it yet; a message already read or deleted is never pushed, so a remove processed first
still wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee as pw

from delivery.outcomes import Outcome, SendResult
from events import MessageEvent
from intake import dead_letters
from models import Message, PushDevice, PushReceipt, User, UserMessage, db, in_thread_connection
from rendering.push import Recipient

logger = logging.getLogger("herald.push")

T = TypeVar("T")

# Receipt kinds: the message push itself, and the remove that clears it.
EVENT_MESSAGE = "message"
EVENT_REMOVE = "remove"
# A remove names at most this many message ids (the newest), as Zulip's apps expect.
MAX_REMOVE_IDS = 200


@dataclass(frozen=True)
class PushPlan:
    """Who gets a push, on which devices (those that have not accepted it yet)."""

    user_id: int
    user_uuid: str
    recipient: Recipient
    devices: list[PushDevice]


@dataclass(frozen=True)
class RemovePlan:
    user_id: int
    user_uuid: str
    recipient: Recipient
    devices: list[PushDevice]
    message_ids: list[int]


def in_connection(fn: Callable[..., T], *args: Any) -> T:
    # The engine's database threads are few and long-lived: each keeps its connection.
    return in_thread_connection(fn, *args)  # type: ignore[no-any-return]


def recipient_of(user: User) -> Recipient:
    return Recipient(
        user_id=user.id,
        email=user.email,
        full_name=user.full_name,
        realm_name=user.realm_name,
        realm_url=user.realm_url,
    )


def store_message(event: MessageEvent) -> None:
    """Keep the message snapshot; a `deleted` mark that arrived first is preserved."""
    data = event.message.model_dump_json()
    Message.insert(id=event.message.id, data=data).on_conflict(
        conflict_target=[Message.id], update={Message.data: data}
    ).execute()


def plan_push(event: MessageEvent) -> PushPlan | None:
    """Decide whether to push `event` and to which devices; marks the push active first."""
    user = User.get_or_none(User.id == event.user_id)
    if user is None or user.is_bot or not user.enable_offline_push_notifications:
        return None
    with db.atomic():
        store_message(event)
        UserMessage.insert(user_id=user.id, message_id=event.message.id).on_conflict_ignore(
        ).execute()
        flags = UserMessage.get(
            (UserMessage.user_id == user.id) & (UserMessage.message_id == event.message.id)
        )
        deleted = Message.get_by_id(event.message.id).deleted
        if flags.read or deleted:
            return None
        if not flags.active_push:
            UserMessage.update(active_push=True).where(UserMessage.id == flags.id).execute()
    done = {
        r.device_id
        for r in PushReceipt.select(PushReceipt.device_id).where(
            (PushReceipt.user_id == user.id)
            & (PushReceipt.message_id == event.message.id)
            & (PushReceipt.event == EVENT_MESSAGE)
        )
    }
    devices = [d for d in PushDevice.select().where(PushDevice.user_id == user.id)
               if d.id not in done]
    if not devices:
        return None
    return PushPlan(user.id, user.uuid, recipient_of(user), devices)


def plan_remove(user_id: int, message_ids: list[int], mark_read: bool) -> RemovePlan | None:
    """Mark the messages read (for `read`), and plan a remove for those with a push out."""
    with db.atomic():
        if mark_read:
            rows = [{"user_id": user_id, "message_id": m, "read": True} for m in message_ids]
            for chunk in pw.chunked(rows, 500):
                UserMessage.insert_many(chunk).on_conflict(
                    conflict_target=[UserMessage.user_id, UserMessage.message_id],
                    update={UserMessage.read: True},
                ).execute()
        active = sorted(
            um.message_id
            for um in UserMessage.select(UserMessage.message_id).where(
                (UserMessage.user_id == user_id)
                & (UserMessage.message_id.in_(message_ids))
                & (UserMessage.active_push == True)  # noqa: E712 - peewee expression
            )
        )
    if not active:
        return None
    user = User.get_or_none(User.id == user_id)
    if user is None:
        return None
    newest = active[-MAX_REMOVE_IDS:]
    done = {
        r.device_id
        for r in PushReceipt.select(PushReceipt.device_id).where(
            (PushReceipt.user_id == user_id)
            & (PushReceipt.message_id == max(newest))
            & (PushReceipt.event == EVENT_REMOVE)
        )
    }
    devices = [d for d in PushDevice.select().where(PushDevice.user_id == user_id)
               if d.id not in done]
    return RemovePlan(user.id, user.uuid, recipient_of(user), devices, newest)


def clear_active(user_id: int, message_ids: list[int]) -> None:
    UserMessage.update(active_push=False).where(
        (UserMessage.user_id == user_id) & (UserMessage.message_id.in_(message_ids))
    ).execute()


def delete_messages(message_ids: list[int], shard: int, shards: int) -> list[int]:
    """Mark messages deleted; return this shard's users who have a push out for them."""
    with db.atomic():
        for mid in message_ids:
            Message.insert(id=mid, data="{}", deleted=True).on_conflict(
                conflict_target=[Message.id], update={Message.deleted: True}
            ).execute()
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


def record_results(
    user_id: int, message_id: int, event: str, results: list[tuple[PushDevice, SendResult]]
) -> None:
    """Receipts for accepted sends, dead devices deleted, permanent failures dead-lettered."""
    with db.atomic():
        for device, result in results:
            # A permanent failure is settled too: its dead letter is written below, and a
            # retry of the event (for another device's transient failure) must not send
            # to this device again.
            if result.outcome in (Outcome.DELIVERED, Outcome.PERMANENT):
                PushReceipt.insert(
                    user_id=user_id, message_id=message_id, device_id=device.id, event=event
                ).on_conflict_ignore().execute()
            elif result.outcome is Outcome.INVALID_DEVICE:
                logger.info("deleting device %s of user %s: %s", device.id, user_id,
                            result.reason)
                PushDevice.delete().where(PushDevice.id == device.id).execute()
    for device, result in results:
        if result.outcome is Outcome.PERMANENT:
            dead_letters.record(
                kind=dead_letters.KIND_PUSH_DEVICE,
                reason=f"{device.kind}: {result.reason}",
                payload={"user_id": user_id, "message_id": message_id, "event": event,
                         "device_id": device.id, "kind": device.kind},
                user_id=user_id,
                attempts=1,
            )


def message_payload(message_id: int) -> dict[str, Any] | None:
    row = Message.get_or_none(Message.id == message_id)
    return json.loads(row.data) if row is not None and row.data != "{}" else None
