"""The event types herald accepts, validated with pydantic; shared by ingest and intake.

An event travels as JSON: the ingest API validates it with `parse_event`, publishes
`event.model_dump(mode="json")` to the broker, and the consumer parses it again with
`parse_event` (cheap, and it keeps one definition of what an event is).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from settings import MAX_BATCHING_PERIOD_SECONDS

# Ids are positive and fit in a signed 64-bit column.
Id = Annotated[int, Field(gt=0, le=2**63 - 1, strict=True)]
# The last second an email can show as a date (23:59:59 UTC on 31 Dec 9999, the end
# of Python's calendar); a later `date_sent` could be queued but never rendered.
LAST_SHOWABLE_SECOND = 253_402_300_799
# A message's id list, as `read` and `message_deleted` carry it.
IdList = Annotated[list[Id], Field(min_length=1, max_length=10_000)]

Trigger = Literal[
    "direct_message",
    "mentioned",
    "topic_wildcard_mentioned",
    "stream_wildcard_mentioned",
    "topic_wildcard_mentioned_in_followed_topic",
    "stream_wildcard_mentioned_in_followed_topic",
    "followed_topic_push_notify",
    "followed_topic_email_notify",
    "stream_push_notify",
    "stream_email_notify",
]
TRIGGERS: tuple[str, ...] = get_args(Trigger)
Channel = Literal["push", "email"]
_ALL_CHANNELS: tuple[Channel, ...] = ("push", "email")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Participant(_Strict):
    id: Id
    full_name: str = Field(min_length=1, max_length=200)


class Message(_Strict):
    """A snapshot of a chat message, as the chat server saw it when it sent the event."""

    id: Id
    sender_id: Id
    sender_full_name: str = Field(min_length=1, max_length=200)
    sender_email: str = Field(min_length=3, max_length=254)
    recipient_type: Literal["stream", "private"]
    stream: str | None = Field(None, max_length=200)
    stream_id: Id | None = None
    topic: str | None = Field(None, max_length=200)
    pm_users: list[Participant] | None = Field(None, max_length=1000)
    content_html: str = Field(max_length=200_000)
    date_sent: int = Field(ge=0, le=LAST_SHOWABLE_SECOND)

    @field_validator("stream", "topic")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _shape(self) -> Message:
        # "field: reason" lets the ingest API name the field of a whole-model rule.
        if self.recipient_type == "stream" and self.stream is None:
            raise ValueError("stream: required for stream messages")
        if self.recipient_type == "stream" and self.topic is None:
            raise ValueError("topic: required for stream messages")
        if self.recipient_type == "private" and self.stream is not None:
            raise ValueError("stream: private messages have no stream")
        return self

    @property
    def is_group_dm(self) -> bool:
        return self.recipient_type == "private" and bool(self.pm_users)


class MessageEvent(_Strict):
    """A user missed a message: push it, email it, or both."""

    type: Literal["message"]
    user_id: Id
    trigger: Trigger
    channels: list[Channel] = Field(default_factory=lambda: list(_ALL_CHANNELS), min_length=1)
    mentioned_user_group_id: Id | None = None
    mentioned_user_group_name: str | None = Field(None, max_length=200)
    message: Message
    # "now" sends the user's open email batch at once (e.g. for direct messages).
    flush: Literal["now"] | None = None

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return sorted(set(value))


class ReadEvent(_Strict):
    """The user read these messages: remove their pushes and drop them from the batch."""

    type: Literal["read"]
    user_id: Id
    message_ids: IdList


class MessageDeletedEvent(_Strict):
    """These messages are gone: for every user, remove pushes and drop them from batches."""

    type: Literal["message_deleted"]
    message_ids: IdList


Event = Annotated[MessageEvent | ReadEvent | MessageDeletedEvent, Field(discriminator="type")]
EventAdapter: TypeAdapter[MessageEvent | ReadEvent | MessageDeletedEvent] = TypeAdapter(Event)


def parse_event(data: Any) -> MessageEvent | ReadEvent | MessageDeletedEvent:
    """Validate one event; raises `pydantic.ValidationError`."""
    return EventAdapter.validate_python(data)


class UserSettingsIn(_Strict):
    """Body of `PUT /v1/users/{user_id}`."""

    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    full_name: str = Field(min_length=1, max_length=200)
    email_batching_period_seconds: int = Field(
        120, gt=0, le=MAX_BATCHING_PERIOD_SECONDS, strict=True
    )
    enable_offline_email_notifications: bool = Field(True, strict=True)
    enable_offline_push_notifications: bool = Field(True, strict=True)
    realm_name: str = Field("", max_length=200)
    realm_url: str = Field("", max_length=500)
    is_bot: bool = Field(False, strict=True)


class DeviceIn(_Strict):
    """Body of `POST /v1/users/{user_id}/devices`."""

    kind: Literal["apns", "fcm"]
    token: str = Field(min_length=1, max_length=1024, pattern=r"^[\x21-\x7e]+$")
    ios_app_id: str | None = Field(None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _ios_app_id(self) -> DeviceIn:
        if self.kind == "apns" and not self.ios_app_id:
            raise ValueError("ios_app_id: required for apns devices")
        return self


class DeviceRef(_Strict):
    """Body of `DELETE /v1/users/{user_id}/devices`."""

    kind: Literal["apns", "fcm"]
    token: str = Field(min_length=1, max_length=1024, pattern=r"^[\x21-\x7e]+$")
