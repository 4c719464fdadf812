"""Push notification payloads for APNs and FCM, compatible with Zulip's mobile apps.

Pure functions of a `Recipient` (who gets the push) and a `MessageEvent` (what they
missed). The shapes follow DESIGN.md's "Push payloads":

- APNs: ``{"aps": {"alert": {"title", "subtitle", "body"}, "sound": "default",
  "badge": 0}, "zulip": {...}}``; a remove is ``{"aps": {"badge": 0}, "zulip": {...}}``.
- FCM: a flat ``data`` dict whose values are all strings.

Choices made where the contract leaves room (all compatible with Zulip's apps, which
read these keys the way Zulip's server sends them):

- Keys that do not apply to a message are left out rather than sent empty: ``stream``,
  ``stream_id`` and ``topic`` only for stream messages, ``pm_users`` only for group DMs,
  ``mentioned_user_group_id`` / ``mentioned_user_group_name`` only when a group was
  mentioned. No value is ever ``None``, so FCM never sees the string ``"None"``.
- FCM strings: integers in decimal, booleans as Python spells them (``"True"`` /
  ``"False"``, what Zulip's server sends through FCM, e.g. ``content_truncated``),
  strings unchanged.
- A group DM is a private message whose ``pm_users`` name more than two people; a
  ``pm_users`` of just the sender and the recipient is treated as a 1:1 DM, as Zulip does.
- A mention trigger wins over the 1:1 rule for the subtitle: a mention inside a 1:1 DM
  shows ``Ada mentioned you:``; a plain 1:1 DM shows an empty subtitle.
- An APNs payload over Apple's 4096 bytes has its alert's title, then subtitle, then
  body cut (``…`` at the end, never below `MIN_ALERT_TEXT_CHARS` characters) by just
  enough to fit; the ``zulip`` keys are never cut. One that still does not fit is left
  whole, for the sender to refuse.
- Extensions for older app versions: ``realm_uri`` (same as ``realm_url``) everywhere,
  ``message_ids`` (a one-element list) in the APNs ``zulip`` dict, and
  ``zulip_message_id`` (the oldest id kept) in FCM remove data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from events import Message, MessageEvent
from rendering.text import ELLIPSIS, PUSH_TEXT_LIMIT, html_to_text, truncate

# APNs `apns-expiration`: a push not delivered within a day is stale.
APNS_EXPIRATION_SECONDS = 24 * 60 * 60
# APNs `apns-push-type` for every herald push (message and remove).
APNS_PUSH_TYPE = "alert"
# FCM Android priority for a new message: wake the device.
FCM_PRIORITY_MESSAGE = "high"
# FCM Android priority for a remove: no need to wake the device.
FCM_PRIORITY_REMOVE = "normal"
# A remove push names at most this many message ids (APNs payloads are capped at 4 KB).
MAX_REMOVE_IDS = 200
# Apple's limit on a notification's JSON payload, in bytes: APNs refuses a larger one,
# and so does the APNs sender, before sending (`delivery.apns.MAX_PAYLOAD_BYTES`).
APNS_MAX_PAYLOAD_BYTES = 4096
# A payload over that limit has its alert lines cut, in this order, until it fits. iOS
# shows the title and the subtitle on one line each, so what is cut from them past that
# line is text the reader would not have seen; the body is shown over several lines (in
# full when expanded), so it goes last. The title goes first: it is the longest line
# when it runs long (stream and topic, or hundreds of names), and the conversation it
# names is still opened from the `zulip` keys, while the subtitle alone says who wrote
# and why the user is told.
ALERT_CUT_ORDER = ("title", "subtitle", "body")
# An alert line is never cut below this many characters (then ``…``): about what one
# line of a notification shows.
MIN_ALERT_TEXT_CHARS = 32
# Replaces the message text when content is redacted.
REDACTED_CONTENT = "New message"
# The badge count: Zulip's apps expect 0 (the server does not count unread pushes).
BADGE_COUNT = 0

# Triggers for which the subtitle reads "Ada mentioned everyone:".
WILDCARD_TRIGGERS = frozenset(
    {
        "topic_wildcard_mentioned",
        "stream_wildcard_mentioned",
        "topic_wildcard_mentioned_in_followed_topic",
        "stream_wildcard_mentioned_in_followed_topic",
    }
)
# The trigger for a personal or group mention ("Ada mentioned you:" / "@group:").
MENTION_TRIGGER = "mentioned"


@dataclass(frozen=True)
class Recipient:
    """The user a notification is for.

    Parameters:
      user_id: the chat server's id of the user.
      email: the user's email address (emails are sent to it).
      full_name: the user's display name.
      realm_name: the organisation's name, shown in emails and sent to the apps.
      realm_url: the organisation's URL, e.g. ``https://chat.example.com``.
    """

    user_id: int
    email: str
    full_name: str
    realm_name: str
    realm_url: str


def is_group_dm(message: Message) -> bool:
    """True for a private message with more than two distinct participants."""
    if message.recipient_type != "private" or not message.pm_users:
        return False
    return len({p.id for p in message.pm_users}) > 2


def other_participant_names(message: Message, user_id: int) -> list[str]:
    """The group DM's participants other than `user_id`, by name, sorted."""
    seen: dict[int, str] = {}
    for participant in message.pm_users or ():
        if participant.id != user_id:
            seen.setdefault(participant.id, participant.full_name)
    return sorted(seen.values(), key=lambda name: (name.casefold(), name))


def server_host(realm_url: str) -> str:
    """The host (and port, if any) of `realm_url`, without credentials; ``""`` if none,
    or if the URL cannot be read (``http://[x``): the push goes out without it."""
    try:
        netloc = urlsplit(realm_url).netloc
    except ValueError:
        return ""
    return netloc.rpartition("@")[2]


def push_title(event: MessageEvent) -> str:
    """The notification's first line.

    ``#stream > topic`` for a stream message, the sender's name for a 1:1 DM, the other
    participants' names (sorted, comma-separated) for a group DM.
    """
    message = event.message
    if message.recipient_type == "stream":
        return f"#{message.stream} > {message.topic}"
    if is_group_dm(message):
        return ", ".join(other_participant_names(message, event.user_id))
    return message.sender_full_name


def push_subtitle(event: MessageEvent) -> str:
    """The notification's second line: who sent it and why the user is told.

    ``Ada mentioned @group:`` / ``Ada mentioned you:`` for a mention,
    ``Ada mentioned everyone:`` for a wildcard mention, empty for a 1:1 DM, and
    ``Ada:`` otherwise.
    """
    message = event.message
    sender = message.sender_full_name
    if event.trigger == MENTION_TRIGGER:
        if event.mentioned_user_group_name:
            return f"{sender} mentioned @{event.mentioned_user_group_name}:"
        return f"{sender} mentioned you:"
    if event.trigger in WILDCARD_TRIGGERS:
        return f"{sender} mentioned everyone:"
    if message.recipient_type == "private" and not is_group_dm(message):
        return ""
    return f"{sender}:"


def push_content(event: MessageEvent, *, redact: bool = False) -> tuple[str, bool]:
    """The message as plain text cut at 200 characters + ``…``, and whether it was cut.

    Parameters:
      event: the missed message.
      redact: send ``New message`` instead of the text.
    """
    if redact:
        return REDACTED_CONTENT, False
    return truncate(html_to_text(event.message.content_html), PUSH_TEXT_LIMIT)


def _base_data(recipient: Recipient) -> dict[str, Any]:
    """Keys every payload carries, so the app can tell which account it is for."""
    return {
        "server": server_host(recipient.realm_url),
        "realm_name": recipient.realm_name,
        "realm_url": recipient.realm_url,
        "realm_uri": recipient.realm_url,
        "user_id": recipient.user_id,
    }


def _message_data(recipient: Recipient, event: MessageEvent, redact: bool) -> dict[str, Any]:
    """The `zulip` / FCM keys of a `message` push, with native Python values."""
    message = event.message
    content, truncated = push_content(event, redact=redact)
    data = _base_data(recipient)
    data.update(
        event="message",
        sender_id=message.sender_id,
        sender_email=message.sender_email,
        sender_full_name=message.sender_full_name,
        time=message.date_sent,
        recipient_type=message.recipient_type,
        zulip_message_id=message.id,
        content=content,
        content_truncated=truncated,
    )
    if message.recipient_type == "stream":
        data["stream"] = message.stream
        if message.stream_id is not None:
            data["stream_id"] = message.stream_id
        data["topic"] = message.topic
    elif is_group_dm(message):
        ids = sorted({p.id for p in message.pm_users or ()})
        data["pm_users"] = ",".join(str(i) for i in ids)
    if event.mentioned_user_group_id is not None:
        data["mentioned_user_group_id"] = event.mentioned_user_group_id
    if event.mentioned_user_group_name is not None:
        data["mentioned_user_group_name"] = event.mentioned_user_group_name
    return data


def fcm_string(value: Any) -> str:
    """One FCM data value as a string: ``True``/``False`` for booleans, decimal for ints."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int):
        return str(value)
    raise TypeError(f"unexpected FCM data value type: {type(value).__name__}")


def _stringify(data: dict[str, Any]) -> dict[str, str]:
    return {key: fcm_string(value) for key, value in data.items() if value is not None}


def apns_payload(
    recipient: Recipient, event: MessageEvent, *, redact: bool = False
) -> dict[str, Any]:
    """The APNs JSON body for a missed message, cut to fit `APNS_MAX_PAYLOAD_BYTES` if it
    can be (see `_fit_alert`).

    Parameters:
      recipient: who gets the push.
      event: the missed message and why it was missed.
      redact: replace the text (body and ``content``) with ``New message``.
    """
    zulip = _message_data(recipient, event, redact)
    zulip["message_ids"] = [event.message.id]
    payload = {
        "aps": {
            "alert": {
                "title": push_title(event),
                "subtitle": push_subtitle(event),
                "body": zulip["content"],
            },
            "sound": "default",
            "badge": BADGE_COUNT,
        },
        "zulip": zulip,
    }
    excess = _json_size(payload) - APNS_MAX_PAYLOAD_BYTES
    return payload if excess <= 0 else _fit_alert(payload, excess)


def _json_size(value: Any) -> int:
    """Bytes of `value` as the APNs client sends it: JSON, non-ASCII unescaped, UTF-8."""
    # "surrogatepass" keeps the measure from raising: text that cannot be encoded is
    # the sender's to refuse, not the renderer's.
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _cut_to_size(text: str, max_bytes: int) -> str:
    """The longest ``text[:n] + "…"`` whose JSON takes at most `max_bytes` bytes, with n
    at least `MIN_ALERT_TEXT_CHARS` (so possibly larger than `max_bytes`).

    `text` must be longer than `MIN_ALERT_TEXT_CHARS`.
    """
    low = MIN_ALERT_TEXT_CHARS
    # Every character takes at least a byte, so no longer prefix can fit; this also
    # keeps each measure below to a few kilobytes, however long `text` is.
    high = min(len(text) - 1, max_bytes)
    while low < high:
        middle = (low + high + 1) // 2
        if _json_size(text[:middle] + ELLIPSIS) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    return text[:low] + ELLIPSIS


def _fit_alert(payload: dict[str, Any], excess: int) -> dict[str, Any]:
    """`payload` with its alert lines cut (`ALERT_CUT_ORDER`) by just enough to shed
    `excess` bytes; `payload` itself if that is not enough, since the `zulip` keys are
    what the app opens the conversation with and are never cut."""
    alert = dict(payload["aps"]["alert"])
    for key in ALERT_CUT_ORDER:
        text = alert[key]
        if len(text) <= MIN_ALERT_TEXT_CHARS:
            continue
        size = _json_size(text)
        shorter = _cut_to_size(text, size - excess)
        saved = size - _json_size(shorter)
        if saved <= 0:
            continue
        alert[key] = shorter
        excess -= saved
        if excess <= 0:
            return {**payload, "aps": {**payload["aps"], "alert": alert}}
    return payload


def fcm_data(recipient: Recipient, event: MessageEvent, *, redact: bool = False) -> dict[str, str]:
    """The FCM ``data`` for a missed message; every value is a string.

    Send it with priority `FCM_PRIORITY_MESSAGE`.

    Parameters:
      recipient: who gets the push.
      event: the missed message and why it was missed.
      redact: replace ``content`` with ``New message``.
    """
    return _stringify(_message_data(recipient, event, redact))


def newest_ids(message_ids: list[int], limit: int = MAX_REMOVE_IDS) -> list[int]:
    """The `limit` largest distinct ids, ascending (larger ids are newer messages)."""
    return sorted(set(message_ids))[-limit:] if limit > 0 else []


def _remove_data(recipient: Recipient, message_ids: list[int]) -> tuple[dict[str, Any], list[int]]:
    kept = newest_ids(message_ids)
    if not kept:
        raise ValueError("a remove push needs at least one message id")
    data = _base_data(recipient)
    data.update(event="remove", zulip_message_ids=",".join(str(i) for i in kept))
    return data, kept


def apns_remove_payload(recipient: Recipient, message_ids: list[int]) -> dict[str, Any]:
    """The APNs body that clears the pushes of `message_ids` (the newest 200 kept, fewer
    if that many would not fit in `APNS_MAX_PAYLOAD_BYTES`).

    Parameters:
      recipient: whose devices to clear.
      message_ids: the read or deleted messages; must not be empty.
    """
    data, kept = _remove_data(recipient, message_ids)
    payload = {"aps": {"badge": BADGE_COUNT}, "zulip": data}
    excess = _json_size(payload) - APNS_MAX_PAYLOAD_BYTES
    while excess > 0 and len(kept) > 1:
        # Over Apple's limit (long realm fields, long ids): the oldest ids go first,
        # each taking its digits and a comma, until it fits; the newest stay cleared.
        drop = 0
        while excess > 0 and drop < len(kept) - 1:
            excess -= len(str(kept[drop])) + 1
            drop += 1
        kept = kept[drop:]
        data = {**data, "zulip_message_ids": ",".join(str(i) for i in kept)}
        payload = {"aps": {"badge": BADGE_COUNT}, "zulip": data}
        excess = _json_size(payload) - APNS_MAX_PAYLOAD_BYTES
    return payload


def fcm_remove_data(recipient: Recipient, message_ids: list[int]) -> dict[str, str]:
    """The FCM ``data`` that clears the pushes of `message_ids` (the newest 200 kept).

    Send it with priority `FCM_PRIORITY_REMOVE`.

    Parameters:
      recipient: whose devices to clear.
      message_ids: the read or deleted messages; must not be empty.
    """
    data, kept = _remove_data(recipient, message_ids)
    # Apps from before `zulip_message_ids` existed read only this one.
    data["zulip_message_id"] = kept[0]
    return _stringify(data)
