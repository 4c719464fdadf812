"""Digest emails as a user's mail client shows them, and unsubscribe tokens."""

from __future__ import annotations

import email
import sys
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

import pytest

from events import Message
from rendering.email import DigestItem, render_digest, sanitize_html
from rendering.push import Recipient
from rendering.unsubscribe import (
    make_unsubscribe_token,
    read_unsubscribe_token,
    unsubscribe_url,
)

ME = Recipient(7, "grace@example.com", "Grace Hopper", "Acme", "https://chat.acme.test")
FROM = "herald <noreply@herald.test>"
UNSUBSCRIBE = "https://herald.test/v1/unsubscribe/tok"
T0 = 1_700_000_000  # Nov 14, 2023, 22:13:20 UTC

PEOPLE = {3: "Ada", 5: "Bob", 7: "Grace Hopper", 9: "Cy", 11: "Dee", 13: "Eve"}


def stream_msg(msg_id: int, topic: str = "logo", sender: int = 3, **kw: Any) -> Message:
    return Message(
        **{
            "id": msg_id,
            "sender_id": sender,
            "sender_full_name": PEOPLE[sender],
            "sender_email": f"user{sender}@example.com",
            "recipient_type": "stream",
            "stream": "design",
            "stream_id": 12,
            "topic": topic,
            "content_html": f"<p>message {msg_id}</p>",
            "date_sent": T0 + msg_id,
            **kw,
        }
    )


def dm(msg_id: int, sender: int = 3, group: list[int] | None = None, **kw: Any) -> Message:
    pm_users = [{"id": i, "full_name": PEOPLE[i]} for i in group] if group else None
    return Message.model_validate(
        {
            "id": msg_id,
            "sender_id": sender,
            "sender_full_name": PEOPLE[sender],
            "sender_email": f"user{sender}@example.com",
            "recipient_type": "private",
            "pm_users": pm_users,
            "content_html": f"<p>dm {msg_id}</p>",
            "date_sent": T0 + msg_id,
            **kw,
        }
    )


def render(items: list[DigestItem], **kw: Any) -> list[EmailMessage]:
    """The digests as a mail client reads them: serialised, then parsed."""
    out = []
    for rendered in render_digest(ME, items, from_addr=FROM, unsubscribe_url=UNSUBSCRIBE,
                                  **kw):
        parsed = email.message_from_bytes(rendered.as_bytes(), policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        out.append(parsed)
    return out


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    return text.get_content(), html.get_content()


# ------------------------------------------------------------------------- grouping


def test_topic_compared_case_insensitively_gives_one_email() -> None:
    emails = render(
        [
            DigestItem(stream_msg(1, "Logo"), "mentioned"),
            DigestItem(stream_msg(2, "logo"), "stream_email_notify"),
            DigestItem(stream_msg(3, "LOGO"), "followed_topic_email_notify"),
        ]
    )
    assert len(emails) == 1
    # The first spelling seen names the conversation.
    assert emails[0]["Subject"] == "#design > Logo"
    text, _ = parts(emails[0])
    assert "message 1" in text and "message 2" in text and "message 3" in text


def test_different_topics_and_streams_are_separate_emails() -> None:
    emails = render(
        [
            DigestItem(stream_msg(1, "logo"), "mentioned"),
            DigestItem(stream_msg(2, "colors"), "mentioned"),
            DigestItem(stream_msg(3, "logo", stream="ops", stream_id=14), "mentioned"),
        ]
    )
    assert [e["Subject"] for e in emails] == ["#design > logo", "#design > colors", "#ops > logo"]


def test_dms_from_two_senders_are_two_emails() -> None:
    emails = render(
        [
            DigestItem(dm(1, sender=3), "direct_message"),
            DigestItem(dm(2, sender=5), "direct_message"),
            DigestItem(dm(3, sender=3), "direct_message"),
        ]
    )
    assert [e["Subject"] for e in emails] == ["DMs with Ada", "DMs with Bob"]
    ada_text, _ = parts(emails[0])
    assert "dm 1" in ada_text and "dm 3" in ada_text and "dm 2" not in ada_text


@pytest.mark.parametrize(
    ("group", "subject"),
    [
        ([3, 5, 7], "Group DMs with Ada and Bob"),
        ([7, 9, 3, 5], "Group DMs with Ada, Bob, and Cy"),
        ([3, 5, 7, 9, 11, 13], "Group DMs with Ada, Bob, and 3 others"),
    ],
)
def test_group_dm_subjects(group: list[int], subject: str) -> None:
    (email,) = render([DigestItem(dm(1, group=group), "direct_message")])
    assert email["Subject"] == subject


def test_group_dm_keyed_by_participant_set() -> None:
    emails = render(
        [
            DigestItem(dm(1, sender=3, group=[3, 5, 7]), "direct_message"),
            DigestItem(dm(2, sender=5, group=[7, 5, 3]), "direct_message"),
            DigestItem(dm(3, sender=3, group=[3, 5, 7, 9]), "direct_message"),
            DigestItem(dm(4, sender=3), "direct_message"),
        ]
    )
    assert [e["Subject"] for e in emails] == [
        "Group DMs with Ada and Bob",
        "Group DMs with Ada, Bob, and Cy",
        "DMs with Ada",
    ]


def test_emails_ordered_by_first_message_and_messages_by_date() -> None:
    emails = render(
        [
            DigestItem(stream_msg(50, "later"), "mentioned"),
            DigestItem(stream_msg(30, "logo"), "mentioned"),
            DigestItem(stream_msg(10, "logo", sender=5), "mentioned"),
        ]
    )
    assert [e["Subject"] for e in emails] == ["#design > logo", "#design > later"]
    text, _ = parts(emails[0])
    assert text.index("message 10") < text.index("message 30")


def test_empty_batch_sends_nothing() -> None:
    assert render([]) == []


# -------------------------------------------------------------------------- content


def test_runs_by_sender_with_time_and_reason() -> None:
    (email,) = render(
        [
            DigestItem(stream_msg(1, sender=3), "mentioned"),
            DigestItem(stream_msg(2, sender=3), "mentioned", "designers"),
            DigestItem(stream_msg(3, sender=5), "stream_wildcard_mentioned"),
            DigestItem(stream_msg(4, sender=3), "followed_topic_email_notify"),
            DigestItem(stream_msg(5, sender=3), "stream_email_notify"),
        ]
    )
    text, html = parts(email)
    # Ada, Bob, Ada: three runs; Ada's first run holds two messages.
    assert [line for line in text.splitlines() if line in ("Ada", "Bob")] == ["Ada", "Bob", "Ada"]
    assert html.count('class="sender-run"') == 3
    assert "Nov 14, 2023, 22:13 UTC" in text
    for reason in (
        "mentioned you",
        "mentioned @designers",
        "mentioned everyone",
        "followed topic",
        "stream notifications",
    ):
        assert reason in text and reason in html
    (dm_email,) = render([DigestItem(dm(9), "direct_message")])
    assert "direct message" in parts(dm_email)[0]


def test_hostile_html_comes_out_clean() -> None:
    hostile = (
        "<p>hi<script>alert('boom')</script>"
        '<img src="https://x.test/a.png" onerror="alert(1)" alt="pic">'
        '<span style="position:fixed;color:red">styled</span>'
        "<style>body { display:none }</style>"
        '<a href="javascript:alert(2)">click</a>'
        '<a href="https://safe.test/page" onclick="steal()">safe</a>'
        '<a href="/user_uploads/f.pdf">file</a>'
        '<a href="data:text/html,x">data</a></p>'
    )
    (email,) = render([DigestItem(stream_msg(1, content_html=hostile), "mentioned")])
    text, html = parts(email)
    lowered = html.lower()
    for bad in (
        "<script",
        "alert(",
        "onerror",
        "onclick",
        "<style",
        "style=",
        "javascript:",
        "data:text",
        "display:none",
        "position:fixed",
    ):
        assert bad not in lowered, bad
    assert '<a href="https://safe.test/page" rel="noopener noreferrer">safe</a>' in html
    # Relative links are resolved against the realm.
    assert 'href="https://chat.acme.test/user_uploads/f.pdf"' in html
    assert "styled" in html and "click" in html
    assert "alert" not in text and "display" not in text


def test_sanitize_html_without_realm_drops_relative_urls() -> None:
    assert sanitize_html('<a href="/x">x</a>') == '<a rel="noopener noreferrer">x</a>'
    assert sanitize_html('<a href="mailto:a@b.test">m</a>', "https://r.test") == (
        '<a href="mailto:a@b.test" rel="noopener noreferrer">m</a>'
    )


@pytest.mark.parametrize("realm_url", ["http://[x", "https://[::1/x", "http://]x["])
def test_a_realm_url_that_cannot_be_parsed_renders_without_the_link(realm_url: str) -> None:
    recipient = Recipient(7, "grace@example.com", "Grace Hopper", "Acme", realm_url)
    content = ('<p>see <a href="/user_uploads/f.pdf">the file</a> and '
               '<a href="https://ok.test/">this</a></p>')
    [rendered] = render_digest(recipient, [DigestItem(stream_msg(1, content_html=content),
                                                      "mentioned")],
                               from_addr=FROM, unsubscribe_url=UNSUBSCRIBE)
    parsed = email.message_from_bytes(rendered.as_bytes(), policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    text, html = parts(parsed)
    assert "see the file and this" in text
    assert "notifications turned on in Acme." in text and realm_url not in text
    assert realm_url not in html and "href=\"http://[" not in html
    # The footer names the realm without a link; a relative link has no base to resolve
    # against, and is dropped; an absolute one stays.
    assert '<a href="https://ok.test/" rel="noopener noreferrer">this</a>' in html
    assert '<a rel="noopener noreferrer">the file</a>' in html
    assert ">Acme<" not in html and "Acme" in html
    assert f"Unsubscribe: {UNSUBSCRIBE}" in text


@pytest.mark.parametrize("href", ["http://[x", "//[x/y", "https://]x[/", "http://[::1"])
def test_a_link_that_cannot_be_parsed_is_dropped_quietly(
    href: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An exception inside nh3's attribute filter is printed with the link (message
    # content) to stderr through sys.unraisablehook; none may happen.
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    html = sanitize_html(f'<p><a href="{href}">link</a> <img src="{href}" alt="pic"></p>',
                         "https://chat.acme.test")
    assert html == '<p><a rel="noopener noreferrer">link</a> <img alt="pic"></p>'
    assert unraisable == []


def test_names_and_topics_are_escaped_in_html() -> None:
    (email,) = render([DigestItem(stream_msg(1, topic="<b>bold</b> & co"), "mentioned")])
    _, html = parts(email)
    assert "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html
    assert email["Subject"] == "#design > <b>bold</b> & co"


def test_more_than_max_messages_says_and_n_more() -> None:
    items = [DigestItem(stream_msg(i), "stream_email_notify") for i in range(1, 13)]
    (email,) = render(items, max_messages=5)
    text, html = parts(email)
    assert "and 7 more messages" in text
    assert "and 7 more messages" in html
    assert "message 5" in text and "message 6" not in text
    (full,) = render(items)
    assert "more message" not in parts(full)[0]


def test_footer_names_realm_and_unsubscribe_link() -> None:
    (email,) = render([DigestItem(stream_msg(1), "mentioned")])
    text, html = parts(email)
    assert "Acme" in text and "https://chat.acme.test" in text
    assert f"Unsubscribe: {UNSUBSCRIBE}" in text
    assert f'<a href="{UNSUBSCRIBE}">Unsubscribe</a>' in html
    assert '<a href="https://chat.acme.test">Acme</a>' in html


def test_headers() -> None:
    now = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    emails = render(
        [DigestItem(stream_msg(1), "mentioned"), DigestItem(dm(2), "mentioned")], now=now
    )
    first, second = emails
    assert first["From"] == FROM
    assert first["To"] == "Grace Hopper <grace@example.com>"
    assert first["Subject"] == "#design > logo"
    assert first["Date"] == "Tue, 02 Jan 2024 03:04:05 +0000"
    assert first["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert first["Auto-Submitted"] == "auto-generated"
    assert first["Message-ID"].startswith("<") and first["Message-ID"].endswith("@herald.test>")
    assert first["Message-ID"] != second["Message-ID"]
    assert first.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in first.iter_parts()] == ["text/plain", "text/html"]


def test_newlines_never_reach_headers() -> None:
    recipient = Recipient(7, "grace@example.com", "Grace\r\nBcc: x@evil.test", "Acme", "")
    (email,) = render_digest(
        recipient,
        [DigestItem(stream_msg(1, topic="a\nBcc: y@evil.test"), "mentioned")],
        from_addr=FROM,
        unsubscribe_url=UNSUBSCRIBE,
    )
    raw = email.as_string()
    assert "\nBcc:" not in raw
    assert email["Subject"] == "#design > a Bcc: y@evil.test"


def test_wire_format_is_crlf_short_lines_and_round_trips_any_text() -> None:
    content = (
        "<p>From the team: caf\u00e9 \u2603 = 100%</p>"
        f"<p>{'long-word ' * 40}</p><p>--=_herald_ fake boundary</p>"
    )
    sent = [DigestItem(stream_msg(1, topic="Caf\u00e9 \u2603", content_html=content), "mentioned")]
    (rendered,) = render_digest(ME, sent, from_addr=FROM, unsubscribe_url=UNSUBSCRIBE)
    raw = rendered.as_bytes()  # what SMTP and the outbox write
    lines = raw.split(b"\r\n")
    assert b"\n" not in b"".join(lines)  # every line ends in CRLF
    assert max(len(line) for line in lines) <= 78
    assert not any(line.startswith(b">From") for line in lines)
    assert raw.isascii()
    parsed = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == "#design > Caf\u00e9 \u2603"
    text, html = parts(parsed)
    assert "From the team: caf\u00e9 \u2603 = 100%" in text
    assert "long-word " * 39 in text
    assert "--=_herald_ fake boundary" in text and "--=_herald_ fake boundary" in html
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]


def test_a_message_listed_twice_is_shown_once() -> None:
    (email,) = render(
        [DigestItem(stream_msg(1), "mentioned"), DigestItem(stream_msg(1), "mentioned")]
    )
    assert parts(email)[0].count("message 1") == 1


# ---------------------------------------------------------------------- unsubscribe


def test_unsubscribe_token_round_trip() -> None:
    token = make_unsubscribe_token(42, "secret-key")
    assert read_unsubscribe_token(token, "secret-key") == 42
    url = unsubscribe_url("https://herald.test/", 42, "secret-key")
    assert url == f"https://herald.test/v1/unsubscribe/{token}"
    assert read_unsubscribe_token(url.rsplit("/", 1)[1], "secret-key") == 42


def test_unsubscribe_token_tampering_is_detected() -> None:
    token = make_unsubscribe_token(42, "secret-key")
    other = make_unsubscribe_token(43, "secret-key")
    assert read_unsubscribe_token(token, "another-key") is None
    _payload, signature = token.split(".")
    forged = other.split(".")[0] + "." + signature
    assert read_unsubscribe_token(forged, "secret-key") is None
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert read_unsubscribe_token(flipped, "secret-key") is None
    for junk in ("", "garbage", "....", "%%%"):
        assert read_unsubscribe_token(junk, "secret-key") is None
