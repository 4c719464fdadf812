"""The ingest operations as a Python API, for HTTP handlers and in-process callers.

Every method validates first and changes nothing when it refuses (`ApiError`).
Methods block (database, broker confirms): HTTP handlers call them on a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import dramatiq
import peewee as pw
from pydantic import ValidationError

from events import (
    DeviceIn,
    DeviceRef,
    MessageDeletedEvent,
    MessageEvent,
    ReadEvent,
    UserSettingsIn,
    parse_event,
)
from ingest.errors import ApiError, from_validation
from intake.consumers import (
    COMMAND_BOUNCER_REGISTER,
    COMMAND_BOUNCER_UNREGISTER,
    COMMAND_REARM_USER,
)
from intake.publisher import Publisher
from intake.queues import EMAIL_ACTOR, EMAIL_QUEUE, push_actor, push_queue, shard_of
from models import (
    IdempotencyKey,
    PushDevice,
    ScheduledMessageNotificationEmail,
    User,
    db,
    write_transaction,
)
from rendering.unsubscribe import read_unsubscribe_token
from settings import Settings

logger = logging.getLogger("herald.ingest")

# Largest user id herald accepts (a signed 64-bit column).
MAX_ID = 2**63 - 1
# Marks an idempotency key whose first request is still being handled.
IN_PROGRESS = 0
# Age past which a key still marked in progress counts as abandoned (its request's
# process died, or the database went away before the answer could be stored), so the
# next retry with that key takes it over. Longer than any request runs: each of its
# database steps waits at most 30 s for a connection or a lock, and the publish
# takes about a second (while RabbitMQ blocks publishing, until the connection's
# blocked timeout, 10 s unless BROKER_URL says otherwise). Were a request slower
# still, its events would be queued twice, which the workers' idempotent steps absorb.
IN_PROGRESS_ABANDONED_SECONDS = 120


class HeraldAPI:
    """herald's ingest operations.

    Parameters:
      settings: limits, shards, bouncer settings, unsubscribe secret.
      broker: where events are published (RabbitMQ with confirms, or in-process).
    """

    def __init__(self, settings: Settings, broker: dramatiq.Broker) -> None:
        self.settings = settings
        self.publisher = Publisher(broker, settings.PUSH_SHARDS)

    # Users ---------------------------------------------------------------------------

    def upsert_user(self, user_id: Any, body: Any) -> dict[str, Any]:
        uid = check_id(user_id)
        try:
            data = UserSettingsIn.model_validate(_object(body))
        except ValidationError as exc:
            raise from_validation(exc) from None
        try:
            user, rearm = self._store_user(uid, data)
        except pw.IntegrityError:
            # Another request created the user between this one's read and its insert
            # (PostgreSQL; SQLite's write lock orders them): this PUT is now an update.
            user, rearm = self._store_user(uid, data)
        if rearm:
            # The worker holding this user's batch must re-read the deadline. Sent on
            # every PUT while a batch is open, not only on a change: a PUT retried after
            # this publish failed finds nothing to change, and must still re-arm.
            self._command(EMAIL_QUEUE, EMAIL_ACTOR, COMMAND_REARM_USER, {"user_id": uid})
        return user.as_dict()  # type: ignore[no-any-return]

    def _store_user(self, uid: int, data: UserSettingsIn) -> tuple[User, bool]:
        """Create or update the user; the stored user, and whether its open email batch
        must be re-armed."""
        with write_transaction():
            user = User.get_or_none(User.id == uid)
            old_period = user.email_batching_period_seconds if user else None
            if user is None:
                user = User.create(id=uid, **data.model_dump())
            else:
                fields = data.model_dump(
                    exclude=set(UserSettingsIn.KEPT_WHEN_OMITTED - data.model_fields_set))
                User.update(updated_at=time.time(), **fields).where(User.id == uid).execute()
                user = User.get_by_id(uid)
            shift = 0 if old_period is None else data.email_batching_period_seconds - old_period
            Row = ScheduledMessageNotificationEmail
            if shift:
                Row.update(scheduled_timestamp=Row.scheduled_timestamp + shift).where(
                    (Row.user_id == uid) & Row.claimed_by.is_null()
                ).execute()
            return user, bool(shift) or Row.select().where(Row.user_id == uid).exists()

    def get_user(self, user_id: Any) -> dict[str, Any]:
        return self._user(user_id).as_dict()  # type: ignore[no-any-return]

    def _user(self, user_id: Any) -> User:
        user = User.get_or_none(User.id == check_id(user_id))
        if user is None:
            raise ApiError(404, "unknown user", "user_id")
        return user

    # Devices ---------------------------------------------------------------------------

    def add_device(self, user_id: Any, body: Any) -> tuple[int, dict[str, Any]]:
        user = self._user(user_id)
        try:
            data = DeviceIn.model_validate(_object(body))
        except ValidationError as exc:
            raise from_validation(exc) from None
        same = (
            (PushDevice.user_id == user.id) & (PushDevice.kind == data.kind)
            & (PushDevice.token == data.token)
        )
        device = PushDevice.get_or_none(same)
        fresh = False
        if device is None:
            try:
                with db.atomic():
                    device = PushDevice.create(user_id=user.id, kind=data.kind,
                                               token=data.token, ios_app_id=data.ios_app_id)
                fresh = True
            except pw.IntegrityError:  # the same device, registered concurrently
                device = PushDevice.get(same)
        elif data.ios_app_id and device.ios_app_id != data.ios_app_id:
            PushDevice.update(ios_app_id=data.ios_app_id).where(
                PushDevice.id == device.id).execute()
            device = PushDevice.get_by_id(device.id)
        # Published for a device already there too: its first registration may never
        # have been published (the broker refused it and the client was answered 503,
        # then retried), and the bouncer takes a registration it has as a no-op.
        self._bouncer_sync(COMMAND_BOUNCER_REGISTER, user, device.as_dict())
        return (201 if fresh else 200), device.as_dict()

    def list_devices(self, user_id: Any) -> dict[str, Any]:
        user = self._user(user_id)
        devices = PushDevice.select().where(PushDevice.user_id == user.id).order_by(PushDevice.id)
        return {"devices": [d.as_dict() for d in devices]}

    def remove_device(self, user_id: Any, body: Any) -> None:
        user = self._user(user_id)
        try:
            data = DeviceRef.model_validate(_object(body))
        except ValidationError as exc:
            raise from_validation(exc) from None
        device = PushDevice.get_or_none(
            (PushDevice.user_id == user.id) & (PushDevice.kind == data.kind)
            & (PushDevice.token == data.token)
        )
        if device is None:
            raise ApiError(404, "unknown device", "token")
        # The unregister is queued before the row goes, so a request whose publish fails
        # (503) leaves the device in place, and its retry finds it and publishes again.
        # Deleting first would make that retry a 404 that never tells the bouncer; and
        # publishing for a device herald does not have would dead-letter each such
        # request, as the bouncer refuses to unregister a token it does not know.
        self._bouncer_sync(COMMAND_BOUNCER_UNREGISTER, user, device.as_dict())
        PushDevice.delete().where(PushDevice.id == device.id).execute()

    def _bouncer_sync(self, command: str, user: User, device: dict[str, Any]) -> None:
        if not self.settings.PUSH_BOUNCER_URL:
            return
        shard = shard_of(user.id, self.settings.PUSH_SHARDS)
        self._command(push_queue(shard), push_actor(shard), command,
                      {"user_id": user.id, "user_uuid": user.uuid, **device})

    # Events ----------------------------------------------------------------------------

    def submit_events(self, body: Any) -> dict[str, int]:
        """Validate every event (all or nothing), then queue them; `{"accepted": n}`."""
        raw = _event_list(body, self.settings.MAX_EVENTS_PER_REQUEST)
        events: list[MessageEvent | ReadEvent | MessageDeletedEvent] = []
        prefix_of = (lambda i: f"events[{i}]") if isinstance(body, dict) and "events" in body \
            else (lambda i: "")
        for i, item in enumerate(raw):
            tag = item.get("type") if isinstance(item, dict) else None
            try:
                events.append(parse_event(item))
            except ValidationError as exc:
                raise from_validation(exc, prefix_of(i), tag=tag if isinstance(tag, str)
                                      else None) from None
        needed = {e.user_id for e in events if not isinstance(e, MessageDeletedEvent)}
        known = {
            u.id for u in User.select(User.id).where(User.id.in_(sorted(needed)))
        } if needed else set()
        for i, event in enumerate(events):
            if not isinstance(event, MessageDeletedEvent) and event.user_id not in known:
                field = f"{prefix_of(i)}.user_id".lstrip(".")
                raise ApiError(422, f"unknown user {event.user_id}", field)
        self._publish(events)
        return {"accepted": len(events)}

    def _publish(self, events: list[Any]) -> None:
        try:
            self.publisher.publish(events)
        except Exception as exc:
            logger.error("publish failed: %s", type(exc).__name__)
            raise ApiError(503, "the queue is unavailable; retry (with the same "
                                "Idempotency-Key)", None) from None

    def _command(self, queue: str, actor: str, command: str, payload: dict[str, Any]) -> None:
        try:
            self.publisher.command(queue, actor, command, payload)
        except Exception as exc:
            logger.error("publish of %s failed: %s", command, type(exc).__name__)
            raise ApiError(503, "the queue is unavailable; retry", None) from None

    # Pending ---------------------------------------------------------------------------

    def pending(self, user_id: Any) -> dict[str, Any]:
        user = self._user(user_id)
        Row = ScheduledMessageNotificationEmail
        rows = Row.select().where(Row.user_id == user.id).order_by(Row.scheduled_timestamp,
                                                                     Row.message_id)
        return {
            "pending": [
                {"message_id": r.message_id, "trigger": r.trigger,
                 "scheduled_timestamp": r.scheduled_timestamp}
                for r in rows
            ]
        }

    # Unsubscribe -----------------------------------------------------------------------

    def unsubscribe(self, token: str) -> dict[str, Any]:
        user_id = read_unsubscribe_token(token, self.settings.secret_key)
        if user_id is None:
            raise ApiError(404, "unknown or tampered unsubscribe link", "token")
        updated = User.update(enable_offline_email_notifications=False,
                              updated_at=time.time()).where(User.id == user_id).execute()
        if not updated:
            raise ApiError(404, "unknown user", "token")
        return {"user_id": user_id, "enable_offline_email_notifications": False}

    # Idempotency -----------------------------------------------------------------------

    def idempotent(
        self, api_key: str, key: str | None, raw_body: bytes, run: Any
    ) -> tuple[int, dict[str, Any]]:
        """Run `run()` once per `Idempotency-Key` (per API key) within the TTL.

        A repeat with the same body gets the stored answer; a different body is a 422;
        a repeat while the first is still running is a 409. A refused request stores
        nothing, so it can be corrected and sent again with the same key. A key marked
        in progress for longer than `IN_PROGRESS_ABANDONED_SECONDS` was abandoned (its
        request never finished storing an answer): a repeat takes it over and runs.
        """
        if key is None:
            return run()  # type: ignore[no-any-return]
        if not (0 < len(key) <= 255) or not key.isprintable():
            raise ApiError(400, "Idempotency-Key must be 1-255 printable characters",
                           "Idempotency-Key")
        scoped = scoped_key(api_key, key)
        digest = hashlib.sha256(raw_body).hexdigest()
        now = time.time()
        ttl = self.settings.IDEMPOTENCY_TTL_SECONDS
        existing = IdempotencyKey.get_or_none(IdempotencyKey.key == scoped)
        if existing is not None and existing.created_at < now - ttl:
            # Only while still expired: another retry may have replaced it since the
            # read with a key of its own, in progress, which must stay and answer 409.
            IdempotencyKey.delete().where(
                (IdempotencyKey.key == scoped) & (IdempotencyKey.created_at < now - ttl)
            ).execute()
            existing = None
        if existing is not None:
            if not _take_over(existing, digest, now):
                return _replay(existing, digest)
        else:
            try:
                IdempotencyKey.create(key=scoped, request_hash=digest, status=IN_PROGRESS,
                                      body="", created_at=now)
            except pw.IntegrityError:
                again = IdempotencyKey.get_or_none(IdempotencyKey.key == scoped)
                if again is None:
                    raise ApiError(409, "a request with this Idempotency-Key is in progress",
                                   "Idempotency-Key") from None
                return _replay(again, digest)
        try:
            status, answer = run()
        except BaseException:
            IdempotencyKey.delete().where(IdempotencyKey.key == scoped).execute()
            raise
        IdempotencyKey.update(status=status, body=json.dumps(answer)).where(
            IdempotencyKey.key == scoped).execute()
        IdempotencyKey.delete().where(IdempotencyKey.created_at < now - ttl).execute()
        return status, answer


def scoped_key(api_key: str, key: str) -> str:
    """The stored form of an `Idempotency-Key`: one caller's keys never meet another's."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] + ":" + key


def _take_over(row: IdempotencyKey, digest: str, now: float) -> bool:
    """Claim `row` for this request if its own request abandoned it; True if claimed.

    Without this, a request that died before storing its answer (or before removing
    its mark after a failure) would leave its key answering 409 until the TTL ran out.
    The claim is one conditional update, so of two retries that find the same
    abandoned row only one runs the work; the other sees it in progress again.
    """
    cutoff = now - IN_PROGRESS_ABANDONED_SECONDS
    if row.status != IN_PROGRESS or row.created_at >= cutoff or row.request_hash != digest:
        return False
    claimed = IdempotencyKey.update(created_at=now).where(
        (IdempotencyKey.key == row.key) & (IdempotencyKey.status == IN_PROGRESS)
        & (IdempotencyKey.created_at < cutoff)
    ).execute()
    if claimed:
        logger.warning("Idempotency-Key in progress for %.0f s taken over as abandoned",
                       now - row.created_at)
    return bool(claimed)


def _replay(row: IdempotencyKey, digest: str) -> tuple[int, dict[str, Any]]:
    if row.request_hash != digest:
        raise ApiError(422, "Idempotency-Key was used with a different body", "Idempotency-Key")
    if row.status == IN_PROGRESS:
        raise ApiError(409, "a request with this Idempotency-Key is in progress",
                       "Idempotency-Key")
    return int(row.status), json.loads(row.body)


def check_id(value: Any) -> int:
    """A path's user id: a positive integer within 64 bits, else 400."""
    try:
        number = int(value) if isinstance(value, str) and value.isdigit() else value
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number <= MAX_ID:
        raise ApiError(400, "user_id must be a positive integer", "user_id")
    return number


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None)
    return body


def _event_list(body: Any, limit: int) -> list[Any]:
    if isinstance(body, dict) and "events" in body:
        if set(body) != {"events"}:
            raise ApiError(400, "a batch has only the key 'events'", None)
        items = body["events"]
        if not isinstance(items, list):
            raise ApiError(400, "events must be a list", "events")
        if not items:
            raise ApiError(400, "events must not be empty", "events")
        if len(items) > limit:
            raise ApiError(413, f"at most {limit} events per request", "events")
        return items
    if isinstance(body, dict):
        return [body]
    raise ApiError(400, "the body must be an event or {\"events\": [...]}", None)
