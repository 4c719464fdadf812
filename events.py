"""The event types herald accepts, validated with pydantic; shared by ingest and intake.

An event travels as JSON: the ingest API validates it with `parse_event`, publishes
`event.model_dump(mode="json")` to the broker, and the consumer parses it again with
`parse_event` (cheap, and it keeps one definition of what an event is).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, get_args

import idna
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict

from settings import MAX_BATCHING_PERIOD_SECONDS


def _integral(value: Any) -> Any:
    # JSON has one number type: 120.0 is the integer 120 (as JSON Schema says); 1.5,
    # true and "120" stay as they are for the strict check to refuse.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# JSON integers (an int, or a float with nothing after the point; never a bool or
# text). The bounds come before the validator so that they reach the JSON Schema.
# Ids are positive and fit in a signed 64-bit column.
Id = Annotated[int, Field(gt=0, le=2**63 - 1, strict=True), BeforeValidator(_integral)]
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


# The one character PostgreSQL cannot keep in text (psycopg2 refuses to send it).
NUL = "\x00"
# Text without NUL: what the OpenAPI document says of every string (`ingest.openapi`).
NO_NUL_PATTERN = "^[^\\u0000]*$"


class _Strict(BaseModel):
    """The base of every request body: no extra fields, and no NUL in any string."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A value the database cannot store fails on every try: a user PUT would answer
        # 503 for ever and an event would be retried until dead-lettered. Refused here,
        # once for every field of every body (a string inside a list is either a
        # `Literal` or a field of a nested `_Strict`, so none is missed).
        if isinstance(value, str) and NUL in value:
            raise ValueError("must not contain the NUL character (U+0000)")
        return value


class Participant(_Strict):
    id: Id
    full_name: str = Field(min_length=1, max_length=200)


# What counts as space, spelled out: regex engines disagree on `\s` (Python's, Rust's
# and JavaScript's differ on U+0085, U+001C-U+001F and U+FEFF), and the OpenAPI
# document must mean what the validation does. Python's whitespace, and U+FEFF.
_SPACE_CHARS = "".join(
    chr(c) for c in [*range(0x09, 0x0E), *range(0x1C, 0x21), 0x85, 0xA0, 0x1680,
                     *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF]
)
# The same, as the inside of a regex character class every engine reads alike.
_SPACES = "".join(f"\\u{ord(c):04x}" for c in _SPACE_CHARS)
# Text with something besides space in it (for the OpenAPI document; `_not_blank`
# checks the same).
_NOT_BLANK: JsonDict = {"pattern": f"[^{_SPACES}]"}
# What may stand unquoted before an address's @ (RFC 5322's "atext"), besides the dots
# between runs of it: no space, quote, <, >, comma, semicolon, colon, bracket or
# backslash, any of which would end the address or split the To: header in two.
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-"
_LOCAL_PART = f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*"
# A domain as mail carries it: dot-separated labels of ASCII letters, digits and inner
# hyphens, up to 63 characters each (an internationalised label in its "xn--" form).
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = f"{_LABEL}(?:\\.{_LABEL})*"
# An email address as herald stores it (`deliverable_address` checks the same).
EMAIL_PATTERN = f"^{_LOCAL_PART}@{_DOMAIN}$"
# The longest address SMTP carries (RFC 5321's 256-character path, less its <>).
MAX_EMAIL_LENGTH = 254


def deliverable_address(value: str) -> str:
    """`value` in the form herald stores and mails to; raises ValueError saying why not.

    The digest's To: header and the SMTP envelope take ASCII only (herald does not rely
    on SMTPUTF8, which not every server on a message's way supports), so an address
    must be ASCII once its domain is in IDNA form: a Unicode domain (``bücher.de``) is
    converted (``xn--bcher-kva.de``); a Unicode part before the @ has no such form, and
    is refused.
    """
    if value.count("@") != 1:
        raise ValueError("an email address has exactly one @")
    local, _, domain = value.partition("@")
    if not local.isascii():
        raise ValueError("the part before the @ must be ASCII: herald's mail goes through "
                         "servers that may not take non-ASCII addresses (SMTPUTF8)")
    if not re.fullmatch(_LOCAL_PART, local):
        raise ValueError("the part before the @ may hold letters, digits, dots (not first, "
                         "last or two in a row) and !#$%&'*+/=?^_`{|}~- only; other "
                         "characters would break the email's To: header")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError, and the codec's own
            raise ValueError(f"the domain is not a valid internationalised domain name "
                             f"({exc})") from None
    if not re.fullmatch(_DOMAIN, domain):
        raise ValueError("the domain must be names of letters, digits and hyphens, "
                         "separated by dots")
    address = f"{local}@{domain}"
    if len(address) > MAX_EMAIL_LENGTH:
        raise ValueError(f"longer than {MAX_EMAIL_LENGTH} characters once the domain is in "
                         f"its ASCII (IDNA) form")
    return address


class Message(_Strict):
    """A snapshot of a chat message, as the chat server saw it when it sent the event."""

    # The rules of `_shape`, for the OpenAPI document.
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"recipient_type": {"const": "stream"}}},
         "then": {"required": ["stream", "topic"],
                  "properties": {"stream": {"type": "string"}, "topic": {"type": "string"}}}},
        {"if": {"properties": {"recipient_type": {"const": "private"}}},
         "then": {"properties": {"stream": {"type": "null"}}}},
    ]})

    id: Id
    sender_id: Id
    sender_full_name: str = Field(min_length=1, max_length=200)
    sender_email: str = Field(min_length=3, max_length=254)
    recipient_type: Literal["stream", "private"]
    stream: str | None = Field(None, max_length=200, json_schema_extra=_NOT_BLANK)
    stream_id: Id | None = None
    topic: str | None = Field(None, max_length=200, json_schema_extra=_NOT_BLANK)
    pm_users: list[Participant] | None = Field(None, max_length=1000)
    content_html: str = Field(max_length=200_000)
    date_sent: Annotated[
        int, Field(ge=0, le=LAST_SHOWABLE_SECOND, strict=True), BeforeValidator(_integral)
    ]

    @field_validator("stream", "topic")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip(_SPACE_CHARS):
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


# Said of each setting in `UserSettingsIn.KEPT_WHEN_OMITTED`.
_KEPT_WHEN_OMITTED = "Omitted: the stored value is kept (true for a new user)."


class UserSettingsIn(_Strict):
    """Body of `PUT /v1/users/{user_id}`."""

    # Settings a user also changes through herald (an unsubscribe link turns email
    # off): the chat server's PUT on a profile change need not carry them, and one that
    # does not must not undo that change.
    KEPT_WHEN_OMITTED: ClassVar[frozenset[str]] = frozenset(
        {"enable_offline_email_notifications", "enable_offline_push_notifications"})

    email: str = Field(
        min_length=3, max_length=MAX_EMAIL_LENGTH,
        description="An internationalised domain is also taken, and stored in its IDNA "
                    "(xn--) form; the part before the @ must be ASCII.",
        json_schema_extra={"pattern": EMAIL_PATTERN},
    )
    full_name: str = Field(min_length=1, max_length=200)
    email_batching_period_seconds: Annotated[
        int, Field(gt=0, le=MAX_BATCHING_PERIOD_SECONDS, strict=True), BeforeValidator(_integral)
    ] = 120
    enable_offline_email_notifications: bool = Field(True, strict=True,
                                                     description=_KEPT_WHEN_OMITTED)
    enable_offline_push_notifications: bool = Field(True, strict=True,
                                                    description=_KEPT_WHEN_OMITTED)
    realm_name: str = Field("", max_length=200)
    realm_url: str = Field("", max_length=500)
    is_bot: bool = Field(False, strict=True)

    @field_validator("email")
    @classmethod
    def _deliverable(cls, value: str) -> str:
        return deliverable_address(value)


class DeviceIn(_Strict):
    """Body of `POST /v1/users/{user_id}/devices`."""

    # The rule of `_ios_app_id`, for the OpenAPI document.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"kind": {"const": "apns"}}},
        "then": {"required": ["ios_app_id"], "properties": {"ios_app_id": {"type": "string"}}},
    })

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
