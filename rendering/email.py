"""Missed-message digest emails: one email per conversation in a user's batch.

`render_digest` turns a batch of `DigestItem`s into ready-to-send
`email.message.Message`s, a pure function of its arguments (plus the clock for the
``Date`` header, which `now` can fix, and a unique ``Message-ID``). Their MIME
structure comes from `rendering._mime`, built for speed: rendering is most of the
cost of a flush.

Conversations:

- a stream + topic (the topic compared case-insensitively, the first spelling seen
  used in the subject): ``#stream > topic``;
- a 1:1 DM thread, keyed by the sender: ``DMs with Ada``;
- a group DM, keyed by its set of participants: ``Group DMs with Ada and Bob``,
  ``Group DMs with Ada, Bob, and Cy``, ``Group DMs with Ada, Bob, and 3 others``
  (the participants other than the recipient, sorted by name).

Each email is multipart/alternative (text, then HTML). Messages are in date order,
grouped into consecutive runs by sender; each shows its time (UTC) and why the user
got it. Message HTML is sanitised with nh3 before it goes in: no scripts, styles or
event-handler attributes, only http/https/mailto URLs (relative ones are resolved
against the realm URL), and ``rel="noopener noreferrer"`` on links. Beyond
`max_messages` the email ends with "and N more messages". Emails are returned in the
order of each conversation's first message.

A message that appears twice in one batch is shown once, with the first item's reason.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import Header
from email.message import Message as MimeMessage
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import SplitResult, urljoin, urlsplit

import nh3
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from events import Message
from rendering._mime import multipart_alternative, text_part
from rendering.push import Recipient, is_group_dm, other_participant_names
from rendering.text import html_to_text

# Messages shown in one email before "and N more".
DEFAULT_MAX_MESSAGES = 50
# Group DM subjects name this many people before "and N others".
GROUP_SUBJECT_NAMES = 2
# URL schemes allowed in message links and images.
ALLOWED_URL_SCHEMES = frozenset({"http", "https", "mailto"})
# `rel` added to every link in message content.
LINK_REL = "noopener noreferrer"
# Value of the RFC 8058 one-click unsubscribe header.
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
# Message-ID domain when the From address has no usable one.
FALLBACK_MESSAGE_ID_DOMAIN = "herald.invalid"
# Message-IDs: a per-process random part and a counter, unique without a syscall each.
_MESSAGE_ID_PREFIX = os.urandom(8).hex()
_message_id_counter = itertools.count(1)
# Templates live next to this module (packaged as rendering/templates/*).
TEMPLATE_DIR = Path(__file__).with_name("templates")
# Month names fixed in English, whatever the process locale.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Control characters (CR, LF, tabs, ...) that must never reach a header.
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")

# Why the user got a message, per trigger, as shown next to it.
REASONS: dict[str, str] = {
    "direct_message": "direct message",
    "mentioned": "mentioned you",
    "topic_wildcard_mentioned": "mentioned everyone",
    "stream_wildcard_mentioned": "mentioned everyone",
    "topic_wildcard_mentioned_in_followed_topic": "mentioned everyone in a followed topic",
    "stream_wildcard_mentioned_in_followed_topic": "mentioned everyone in a followed topic",
    "followed_topic_push_notify": "followed topic",
    "followed_topic_email_notify": "followed topic",
    "stream_push_notify": "stream notifications",
    "stream_email_notify": "stream notifications",
}

_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    autoescape=select_autoescape(enabled_extensions=("html",), default=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class DigestItem:
    """One missed message in a user's email batch.

    Parameters:
      message: the message as the chat server sent it.
      trigger: why the user was notified (one of `events.TRIGGERS`).
      mentioned_user_group_name: the group mentioned, for a group mention.
    """

    message: Message
    trigger: str
    mentioned_user_group_name: str | None = None


@dataclass
class _Conversation:
    """Items of one conversation, in arrival order until sorted."""

    subject: str
    items: list[DigestItem] = field(default_factory=list)


def reason_text(item: DigestItem) -> str:
    """Why the user got this message, e.g. ``mentioned you`` or ``mentioned @devs``."""
    if item.trigger == "mentioned" and item.mentioned_user_group_name:
        return f"mentioned @{item.mentioned_user_group_name}"
    return REASONS.get(item.trigger, "notification")


def format_time(timestamp: int) -> str:
    """A message time for people, in UTC: ``Nov 14, 2023, 22:13 UTC``."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return f"{_MONTHS[moment.month - 1]} {moment.day}, {moment.year}, {moment:%H:%M} UTC"


def conversation_key(message: Message) -> tuple[Any, ...]:
    """What makes two messages part of the same email."""
    if message.recipient_type == "stream":
        # The id survives a stream rename; the name is the fallback when no id was sent.
        stream: int | str = message.stream_id or (message.stream or "").casefold()
        return ("stream", stream, (message.topic or "").casefold())
    if is_group_dm(message):
        return ("group", frozenset(p.id for p in message.pm_users or ()))
    return ("dm", message.sender_id)


def group_dm_subject(names: Sequence[str]) -> str:
    """``Group DMs with Ada and Bob`` / ``Ada, Bob, and Cy`` / ``Ada, Bob, and 3 others``."""
    if len(names) <= 1:
        return "Group DMs with " + (names[0] if names else "yourself")
    if len(names) == 2:
        return f"Group DMs with {names[0]} and {names[1]}"
    if len(names) == 3:
        return f"Group DMs with {names[0]}, {names[1]}, and {names[2]}"
    shown = ", ".join(names[:GROUP_SUBJECT_NAMES])
    return f"Group DMs with {shown}, and {len(names) - GROUP_SUBJECT_NAMES} others"


def conversation_subject(recipient: Recipient, message: Message) -> str:
    """The email subject for the conversation `message` belongs to."""
    if message.recipient_type == "stream":
        return f"#{message.stream} > {message.topic}"
    if is_group_dm(message):
        return group_dm_subject(other_participant_names(message, recipient.user_id))
    return f"DMs with {message.sender_full_name}"


def _header_safe(value: str) -> str:
    return _HEADER_UNSAFE.sub(" ", value).strip()


def _url_parts(url: str) -> SplitResult | None:
    """`urlsplit(url)`, or None for a URL it refuses (a malformed IPv6 host such as
    ``http://[x``). Realm URLs and message links are outside data: one that cannot be
    read leaves its link out, it must not fail the email."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _absolute_http_url(url: str) -> str | None:
    parts = _url_parts(url)
    if parts is None:
        return None
    return url if parts.scheme in ("http", "https") and parts.netloc else None


def sanitize_html(html: str, base_url: str = "") -> str:
    """Message HTML made safe for an email.

    Parameters:
      html: the message's rendered HTML, possibly hostile.
      base_url: relative links and images are resolved against this (the realm URL);
        without an absolute http(s) base they are dropped.
    """
    base = _absolute_http_url(base_url)

    def _filter(tag: str, attribute: str, value: str) -> str | None:
        if attribute not in ("href", "src", "cite"):
            return value
        parts = _url_parts(value)
        if parts is None:
            # nh3 would drop the attribute anyway, but print the exception, with the
            # link, to stderr: message content must not reach the logs.
            return None
        if parts.scheme:
            # nh3 already refused schemes outside ALLOWED_URL_SCHEMES.
            return value
        if base is None:
            return None
        try:
            resolved = urljoin(base.rstrip("/") + "/", value)
        except ValueError:
            return None
        resolved_parts = _url_parts(resolved)
        if resolved_parts is None or resolved_parts.scheme not in ALLOWED_URL_SCHEMES:
            return None
        return resolved

    return nh3.clean(
        html,
        url_schemes=set(ALLOWED_URL_SCHEMES),
        link_rel=LINK_REL,
        strip_comments=True,
        attribute_filter=_filter,
    )


def _runs(items: list[DigestItem], base_url: str) -> list[dict[str, Any]]:
    """Consecutive messages by one sender, each with its time, reason and content."""
    runs: list[dict[str, Any]] = []
    for item in items:
        message = item.message
        clean = sanitize_html(message.content_html, base_url)
        entry = {
            "message_id": message.id,
            "time": format_time(message.date_sent),
            "reason": reason_text(item),
            # Sanitised above: safe to insert unescaped.
            "html": Markup(clean),
            "text": html_to_text(clean),
        }
        if runs and runs[-1]["sender_id"] == message.sender_id:
            runs[-1]["entries"].append(entry)
        else:
            runs.append(
                {
                    "sender_id": message.sender_id,
                    "sender_name": message.sender_full_name,
                    "entries": [entry],
                }
            )
    return runs


@lru_cache(maxsize=16)
def _message_id_domain(from_addr: str) -> str:
    domain = parseaddr(from_addr)[1].rpartition("@")[2].strip().strip("[]")
    if not domain or not domain.isascii() or _HEADER_UNSAFE.search(domain) or " " in domain:
        return FALLBACK_MESSAGE_ID_DOMAIN
    return domain


@lru_cache(maxsize=16)
def _sender(from_addr: str) -> str:
    return formataddr(parseaddr(from_addr))


def _conversations(recipient: Recipient, items: list[DigestItem]) -> list[_Conversation]:
    ordered = sorted(items, key=lambda i: (i.message.date_sent, i.message.id))
    seen_ids: set[int] = set()
    by_key: dict[tuple[Any, ...], _Conversation] = {}
    for item in ordered:
        if item.message.id in seen_ids:
            continue
        seen_ids.add(item.message.id)
        key = conversation_key(item.message)
        conversation = by_key.get(key)
        if conversation is None:
            # The first message seen names the conversation (its topic spelling).
            conversation = _Conversation(conversation_subject(recipient, item.message))
            by_key[key] = conversation
        conversation.items.append(item)
    # dicts keep insertion order: conversations by their first message.
    return list(by_key.values())


def render_digest(
    recipient: Recipient,
    items: list[DigestItem],
    *,
    from_addr: str,
    unsubscribe_url: str,
    max_messages: int = DEFAULT_MAX_MESSAGES,
    now: datetime | None = None,
) -> list[MimeMessage]:
    """One email per conversation in `items`; an empty list for an empty batch.

    Parameters:
      recipient: who the emails go to (``To: Full Name <email>``) and their realm.
      items: the batch's messages, in any order.
      from_addr: the ``From`` header, e.g. ``herald <noreply@example.com>``.
      unsubscribe_url: the one-click unsubscribe link (footer and ``List-Unsubscribe``).
      max_messages: messages shown per email; the rest are counted as "and N more".
      now: the ``Date`` header's time (default: the current time).
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    moment = now or datetime.now(tz=UTC)
    domain = _message_id_domain(from_addr)
    realm_link = _absolute_http_url(recipient.realm_url)
    html_template = _env.get_template("digest_email.html")
    text_template = _env.get_template("digest_email.txt")
    emails: list[MimeMessage] = []
    sender = _sender(from_addr)
    for conversation in _conversations(recipient, items):
        shown = conversation.items[:max_messages]
        subject = _header_safe(conversation.subject)
        context = {
            "subject": subject,
            "runs": _runs(shown, recipient.realm_url),
            "more": len(conversation.items) - len(shown),
            "realm_name": recipient.realm_name,
            "realm_link": realm_link,
            "unsubscribe_url": unsubscribe_url,
        }
        email = multipart_alternative()
        email["From"] = sender
        email["To"] = formataddr((_header_safe(recipient.full_name), recipient.email))
        # compat32 messages take a `Header` and encode it (RFC 2047) when serialised.
        email["Subject"] = subject if subject.isascii() else cast(str, Header(subject, "utf-8"))
        email["Date"] = format_datetime(moment.astimezone(UTC))
        email["Message-ID"] = (
            f"<{_MESSAGE_ID_PREFIX}.{next(_message_id_counter)}.{recipient.user_id}@{domain}>"
        )
        email["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        email["List-Unsubscribe-Post"] = LIST_UNSUBSCRIBE_POST
        email["Auto-Submitted"] = "auto-generated"
        email.attach(text_part(text_template.render(context), "plain"))
        email.attach(text_part(html_template.render(context), "html"))
        emails.append(email)
    return emails
