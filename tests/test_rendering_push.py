"""Push payloads as a user's phone shows them, and the HTML-to-text rules behind the body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from events import MessageEvent
from rendering import push
from rendering.push import (
    APNS_EXPIRATION_SECONDS,
    APNS_MAX_PAYLOAD_BYTES,
    MAX_REMOVE_IDS,
    MIN_ALERT_TEXT_CHARS,
    Recipient,
    apns_payload,
    apns_remove_payload,
    fcm_data,
    fcm_remove_data,
    fcm_string,
    push_content,
    push_subtitle,
    push_title,
    server_host,
)
from rendering.text import html_to_text, truncate

ME = Recipient(
    user_id=7,
    email="grace@example.com",
    full_name="Grace",
    realm_name="Acme",
    realm_url="https://chat.acme.test",
)


def event(
    trigger: str = "mentioned",
    *,
    kind: str = "stream",
    html: str = "<p>Hello</p>",
    group: str | None = None,
    **message: Any,
) -> MessageEvent:
    body: dict[str, Any] = {
        "id": 1001,
        "sender_id": 3,
        "sender_full_name": "Ada",
        "sender_email": "ada@example.com",
        "content_html": html,
        "date_sent": 1_700_000_000,
    }
    if kind == "stream":
        body.update(recipient_type="stream", stream="design", stream_id=12, topic="logo")
    elif kind == "dm":
        body.update(recipient_type="private")
    else:
        body.update(
            recipient_type="private",
            pm_users=[
                {"id": 3, "full_name": "Ada"},
                {"id": 7, "full_name": "Grace"},
                {"id": 9, "full_name": "Cy"},
                {"id": 5, "full_name": "Bob"},
            ],
        )
    body.update(message)
    return MessageEvent.model_validate(
        {
            "type": "message",
            "user_id": ME.user_id,
            "trigger": trigger,
            "mentioned_user_group_id": 40 if group else None,
            "mentioned_user_group_name": group,
            "message": body,
        }
    )


# ----------------------------------------------------------------- titles, subtitles


def test_titles_per_conversation_type() -> None:
    assert push_title(event(kind="stream")) == "#design > logo"
    assert push_title(event("direct_message", kind="dm")) == "Ada"
    # The other participants, sorted; never the recipient's own name.
    assert push_title(event("direct_message", kind="group")) == "Ada, Bob, Cy"


@pytest.mark.parametrize(
    ("trigger", "group", "expected"),
    [
        ("mentioned", None, "Ada mentioned you:"),
        ("mentioned", "designers", "Ada mentioned @designers:"),
        ("topic_wildcard_mentioned", None, "Ada mentioned everyone:"),
        ("stream_wildcard_mentioned", None, "Ada mentioned everyone:"),
        ("topic_wildcard_mentioned_in_followed_topic", None, "Ada mentioned everyone:"),
        ("stream_wildcard_mentioned_in_followed_topic", None, "Ada mentioned everyone:"),
        ("followed_topic_push_notify", None, "Ada:"),
        ("stream_push_notify", None, "Ada:"),
    ],
)
def test_stream_subtitles_per_trigger(trigger: str, group: str | None, expected: str) -> None:
    assert push_subtitle(event(trigger, group=group)) == expected


def test_dm_subtitles() -> None:
    assert push_subtitle(event("direct_message", kind="dm")) == ""
    assert push_subtitle(event("direct_message", kind="group")) == "Ada:"
    assert push_subtitle(event("mentioned", kind="group")) == "Ada mentioned you:"
    # A mention still says so inside a 1:1 DM.
    assert push_subtitle(event("mentioned", kind="dm")) == "Ada mentioned you:"


def test_group_dm_of_two_is_shown_as_a_1to1_dm() -> None:
    two = event(
        "direct_message",
        kind="group",
        pm_users=[{"id": 3, "full_name": "Ada"}, {"id": 7, "full_name": "Grace"}],
    )
    assert push_title(two) == "Ada"
    assert push_subtitle(two) == ""
    assert "pm_users" not in fcm_data(ME, two)


# ------------------------------------------------------------------------- payloads


def test_apns_payload_shape() -> None:
    payload = apns_payload(ME, event(html="<p>Look at <strong>this</strong></p>"))
    assert payload["aps"] == {
        "alert": {
            "title": "#design > logo",
            "subtitle": "Ada mentioned you:",
            "body": "Look at this",
        },
        "sound": "default",
        "badge": 0,
    }
    zulip = payload["zulip"]
    assert zulip["event"] == "message"
    assert zulip["server"] == "chat.acme.test"
    assert zulip["realm_url"] == "https://chat.acme.test"
    assert zulip["realm_name"] == "Acme"
    assert zulip["user_id"] == 7
    assert zulip["sender_id"] == 3
    assert zulip["sender_email"] == "ada@example.com"
    assert zulip["sender_full_name"] == "Ada"
    assert zulip["time"] == 1_700_000_000
    assert zulip["recipient_type"] == "stream"
    assert (zulip["stream"], zulip["stream_id"], zulip["topic"]) == ("design", 12, "logo")
    assert zulip["zulip_message_id"] == 1001
    assert zulip["content"] == "Look at this"
    assert zulip["content_truncated"] is False
    assert "pm_users" not in zulip
    assert "mentioned_user_group_id" not in zulip
    json.dumps(payload)  # serialisable as is
    assert APNS_EXPIRATION_SECONDS == 24 * 3600


def test_server_keeps_a_port_and_drops_credentials() -> None:
    recipient = Recipient(7, "g@x.test", "Grace", "Acme", "https://u:p@chat.acme.test:8443/")
    assert apns_payload(recipient, event())["zulip"]["server"] == "chat.acme.test:8443"


def test_a_realm_url_that_cannot_be_read_leaves_the_server_out_of_the_push() -> None:
    assert server_host("http://[x") == ""
    recipient = Recipient(7, "g@x.test", "Grace", "Acme", "http://[x")
    payload = apns_payload(recipient, event())
    assert payload["zulip"]["server"] == ""
    assert payload["aps"]["alert"]["body"]
    assert fcm_data(recipient, event())["server"] == ""


def test_group_dm_payload_lists_every_participant() -> None:
    data = fcm_data(ME, event("direct_message", kind="group"))
    assert data["recipient_type"] == "private"
    assert data["pm_users"] == "3,5,7,9"
    assert "stream" not in data
    assert "topic" not in data


def test_group_mention_keys() -> None:
    data = fcm_data(ME, event("mentioned", group="designers"))
    assert data["mentioned_user_group_id"] == "40"
    assert data["mentioned_user_group_name"] == "designers"


def test_fcm_data_values_are_all_strings() -> None:
    long_html = "<p>" + "x" * 300 + "</p>"
    for ev in (
        event(),
        event("direct_message", kind="dm"),
        event("direct_message", kind="group", html=long_html),
        event("mentioned", group="g"),
    ):
        data = fcm_data(ME, ev)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()), data
        assert "None" not in data.values()
    data = fcm_data(ME, event(html=long_html))
    assert data["event"] == "message"
    assert data["user_id"] == "7"
    assert data["time"] == "1700000000"
    assert data["zulip_message_id"] == "1001"
    assert data["content_truncated"] == "True"
    assert fcm_data(ME, event())["content_truncated"] == "False"


def test_body_is_cut_at_exactly_200_characters_plus_ellipsis() -> None:
    text = "".join(str(i % 10) for i in range(250))
    payload = apns_payload(ME, event(html=f"<p>{text}</p>"))
    body = payload["aps"]["alert"]["body"]
    assert body == text[:200] + "…"
    assert len(body) == 201
    assert payload["zulip"]["content"] == body
    assert payload["zulip"]["content_truncated"] is True

    exact = "y" * 200
    payload = apns_payload(ME, event(html=f"<p>{exact}</p>"))
    assert payload["aps"]["alert"]["body"] == exact
    assert payload["zulip"]["content_truncated"] is False


def test_redacted_content() -> None:
    ev = event(html="<p>the launch code is 1234</p>")
    payload = apns_payload(ME, ev, redact=True)
    assert payload["aps"]["alert"]["body"] == "New message"
    assert payload["zulip"]["content"] == "New message"
    assert fcm_data(ME, ev, redact=True)["content"] == "New message"
    assert "1234" not in json.dumps(payload)


def test_remove_payloads_keep_the_newest_200_ids() -> None:
    ids = list(range(1, 451))
    apns = apns_remove_payload(ME, list(reversed(ids)))
    assert apns["aps"] == {"badge": 0}
    assert apns["zulip"]["event"] == "remove"
    kept = [int(i) for i in apns["zulip"]["zulip_message_ids"].split(",")]
    assert kept == list(range(251, 451))
    assert len(kept) == MAX_REMOVE_IDS
    assert apns["zulip"]["server"] == "chat.acme.test"
    assert apns["zulip"]["user_id"] == 7

    fcm = fcm_remove_data(ME, ids)
    assert fcm["event"] == "remove"
    assert fcm["zulip_message_ids"] == apns["zulip"]["zulip_message_ids"]
    assert all(isinstance(v, str) for v in fcm.values())


def test_small_remove_payload_and_empty_list() -> None:
    assert apns_remove_payload(ME, [3, 1, 2, 2])["zulip"]["zulip_message_ids"] == "1,2,3"
    assert fcm_remove_data(ME, [5])["zulip_message_ids"] == "5"
    with pytest.raises(ValueError):
        apns_remove_payload(ME, [])


# ----------------------------------------------------------- the APNs size limit


def apns_bytes(payload: dict[str, Any]) -> int:
    """The payload's size as the APNs client sends it."""
    return len(json.dumps(payload, ensure_ascii=False).encode())


def assert_zulip_keys_whole(payload: dict[str, Any], ev: MessageEvent) -> None:
    """The `zulip` keys are those of the FCM data, nothing cut: the app opens the
    conversation with them."""
    zulip = dict(payload["zulip"])
    assert zulip.pop("message_ids") == [ev.message.id]
    assert {key: fcm_string(value) for key, value in zulip.items()} == fcm_data(ME, ev)
    assert zulip["content"] == push_content(ev)[0]


def test_the_limit_is_the_one_the_apns_sender_enforces() -> None:
    from delivery.apns import MAX_PAYLOAD_BYTES

    assert APNS_MAX_PAYLOAD_BYTES == MAX_PAYLOAD_BYTES == 4096


def test_a_long_emoji_stream_and_topic_cut_the_title_only() -> None:
    stream = "design" + "🎨" * 194
    topic = "logo" + "🚀" * 196
    sender = "Augusta Ada King, Countess of Lovelace"
    ev = event(
        stream=stream, topic=topic, sender_full_name=sender, html="<p>" + "🙂" * 300 + "</p>"
    )
    assert len(stream) == len(topic) == 200
    payload = apns_payload(ME, ev)
    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    alert = payload["aps"]["alert"]
    full_title = push_title(ev)
    assert alert["title"].startswith("#design🎨")
    assert alert["title"].endswith("…")
    assert full_title.startswith(alert["title"][:-1])
    assert MIN_ALERT_TEXT_CHARS < len(alert["title"]) < len(full_title)
    # Cutting the title was enough: the subtitle and the body, long too, are whole.
    assert alert["subtitle"] == f"{sender} mentioned you:"
    assert alert["body"] == "🙂" * 200 + "…"
    assert (payload["zulip"]["stream"], payload["zulip"]["topic"]) == (stream, topic)
    assert_zulip_keys_whole(payload, ev)


def test_a_group_dm_of_hundreds_of_long_names_cuts_the_title_of_names() -> None:
    participants: list[dict[str, Any]] = [
        {"id": 7, "full_name": "Grace"},
        {"id": 3, "full_name": "Ada"},
    ]
    participants += [
        {"id": 100 + i, "full_name": f"Participant {i:03d} " + "Ω" * 150} for i in range(320)
    ]
    ev = event("direct_message", kind="group", pm_users=participants)
    payload = apns_payload(ME, ev)
    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    title = payload["aps"]["alert"]["title"]
    assert title.startswith("Ada, Participant 000 ΩΩΩ")
    assert title.endswith("…")
    assert push_title(ev).startswith(title[:-1])
    assert payload["aps"]["alert"]["subtitle"] == "Ada:"
    assert payload["aps"]["alert"]["body"] == "Hello"
    ids = sorted(p["id"] for p in participants)
    assert payload["zulip"]["pm_users"] == ",".join(str(i) for i in ids)
    assert_zulip_keys_whole(payload, ev)


def test_a_long_sender_and_group_name_cut_the_mention_subtitle() -> None:
    sender = "Ada " + "🦄" * 196
    group = "designers " + "🎨" * 190
    ev = event(group=group, sender_full_name=sender, html="<p>" + "🙂" * 300 + "</p>")
    payload = apns_payload(ME, ev)
    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    alert = payload["aps"]["alert"]
    # The title is short already; the subtitle is what gets cut.
    assert alert["title"] == "#design > logo"
    subtitle = alert["subtitle"]
    assert subtitle.startswith("Ada 🦄🦄")
    assert subtitle.endswith("…")
    assert push_subtitle(ev).startswith(subtitle[:-1])
    assert MIN_ALERT_TEXT_CHARS < len(subtitle) < len(push_subtitle(ev))
    assert alert["body"] == "🙂" * 200 + "…"
    zulip = payload["zulip"]
    assert (zulip["sender_full_name"], zulip["mentioned_user_group_name"]) == (sender, group)
    assert_zulip_keys_whole(payload, ev)


def test_the_body_is_cut_last_once_title_and_subtitle_are_at_their_minimum() -> None:
    stream, topic = "🎨" * 200, "🚀" * 200
    ev = event(
        group="designers" + "🎨" * 41,
        stream=stream,
        topic=topic,
        sender_full_name="Ada" + "🦄" * 97,
        html="<p>" + "🙂" * 300 + "</p>",
    )
    payload = apns_payload(ME, ev)
    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    alert = payload["aps"]["alert"]
    assert alert["title"] == push_title(ev)[:MIN_ALERT_TEXT_CHARS] + "…"
    assert alert["subtitle"] == push_subtitle(ev)[:MIN_ALERT_TEXT_CHARS] + "…"
    body = alert["body"]
    assert body.endswith("…")
    assert body.startswith("🙂" * MIN_ALERT_TEXT_CHARS)
    assert len(body) < 201
    assert payload["zulip"]["content"] == "🙂" * 200 + "…"
    assert_zulip_keys_whole(payload, ev)


def test_a_payload_that_fits_only_at_the_limit_is_cut_by_no_more_than_needed() -> None:
    ev = event(topic="t" * 200)
    fitting = apns_payload(ME, ev)
    # Pad the one realm key that appears once in the payload up to the limit exactly.
    pad = APNS_MAX_PAYLOAD_BYTES - apns_bytes(fitting)
    at_limit = Recipient(7, ME.email, ME.full_name, "A" * (len(ME.realm_name) + pad), ME.realm_url)
    payload = apns_payload(at_limit, ev)
    assert apns_bytes(payload) == APNS_MAX_PAYLOAD_BYTES
    assert payload["aps"]["alert"]["title"] == push_title(ev)

    over = Recipient(7, ME.email, ME.full_name, at_limit.realm_name + "A", ME.realm_url)
    payload = apns_payload(over, ev)
    # Four characters make way for the three bytes of "…".
    assert payload["aps"]["alert"]["title"] == push_title(ev)[:-4] + "…"
    assert apns_bytes(payload) == APNS_MAX_PAYLOAD_BYTES


def test_a_payload_that_cannot_fit_by_cutting_the_alert_is_left_whole() -> None:
    # The ids of 1000 participants alone are over the limit.
    participants = [{"id": 10**18 + i, "full_name": "Ω" * 200} for i in range(999)]
    participants.append({"id": 7, "full_name": "Grace"})
    ev = event("direct_message", kind="group", pm_users=participants)
    payload = apns_payload(ME, ev)
    assert apns_bytes(payload) > APNS_MAX_PAYLOAD_BYTES
    assert payload["aps"]["alert"] == {
        "title": push_title(ev),
        "subtitle": push_subtitle(ev),
        "body": "Hello",
    }
    assert_zulip_keys_whole(payload, ev)


def test_a_payload_that_fits_is_the_one_the_contract_describes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    measure = push._json_size

    def counted(value: Any) -> int:
        sizes.append(measure(value))
        return sizes[-1]

    monkeypatch.setattr(push, "_json_size", counted)
    ev = event("mentioned", kind="group", html="<p>" + "x" * 300 + "</p>")
    payload = apns_payload(ME, ev)
    # Measured once, as a whole, and nothing more.
    assert len(sizes) == 1
    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    assert payload["aps"] == {
        "alert": {
            "title": "Ada, Bob, Cy",
            "subtitle": "Ada mentioned you:",
            "body": "x" * 200 + "…",
        },
        "sound": "default",
        "badge": 0,
    }
    assert_zulip_keys_whole(payload, ev)


# ------------------------------------------------------------------- html_to_text


def test_mentions_read_as_their_text() -> None:
    html = (
        '<p>Hi <span class="user-mention" data-user-id="3">@Ada</span> and '
        '<span class="user-group-mention" data-user-group-id="4">@designers</span>!</p>'
    )
    assert html_to_text(html) == "Hi @Ada and @designers!"


def test_emoji_become_names() -> None:
    html = (
        '<p>Ship it <span aria-label="rocket" class="emoji emoji-1f680" role="img" '
        'title="rocket">:rocket:</span> <img alt=":parrot:" class="emoji" '
        'src="/user_avatars/1/emoji/parrot.png" title="parrot"> '
        '<span class="emoji emoji-1f44d" title="thumbs up"></span></p>'
    )
    assert html_to_text(html) == "Ship it :rocket: :parrot: :thumbs_up:"


def test_images_read_as_alt_text_and_links_as_text() -> None:
    html = (
        '<p>See <a href="https://x.test/d">the   design\n doc</a> '
        '<img src="d.png" alt="diagram"></p>'
    )
    assert html_to_text(html) == "See the design doc diagram"


def test_blockquote_lines_are_prefixed() -> None:
    html = "<blockquote><p>first line</p><p>second</p></blockquote><p>my reply</p>"
    assert html_to_text(html) == "> first line\n> second\nmy reply"


def test_nested_lists() -> None:
    html = (
        "<ul><li>fruit<ul><li>apple</li><li>pear</li></ul></li><li>bread</li></ul>"
        "<ol start='3'><li>third</li><li>fourth</li></ol>"
    )
    assert html_to_text(html) == "- fruit\n  - apple\n  - pear\n- bread\n3. third\n4. fourth"


@pytest.mark.parametrize(
    ("start", "first"),
    [
        ("3", "3"),
        ("-2", "-2"),
        ("+4", "4"),
        (" 5 ", "5"),
        ("999999999", "999999999"),
        # Not a plain decimal integer: numbered from 1, as if there were no start.
        ("--1", "1"),
        ("²", "1"),  # a superscript, which str.isdigit accepts
        ("٣", "1"),  # an Arabic-Indic digit
        ("-", "1"),
        ("3.5", "1"),
        ("0x10", "1"),
        ("1_000", "1"),
        ("", "1"),
        ("1" * 10, "1"),
        ("9" * 5000, "1"),  # longer than int() converts at all
    ],
)
def test_an_ordered_lists_start_is_read_only_when_it_is_a_plain_integer(
    start: str, first: str
) -> None:
    html = f'<p>steps</p><ol start="{start}"><li>one</li><li>two</li></ol>'
    text = html_to_text(html)
    assert text == f"steps\n{first}. one\n{int(first) + 1}. two"
    # The push shows the same text.
    assert apns_payload(ME, event(html=html))["aps"]["alert"]["body"] == text


def test_code_blocks_keep_their_layout() -> None:
    html = (
        '<div class="codehilite"><pre><span></span>'
        "<code>def f():\n    return  1\n</code></pre></div>"
    )
    assert html_to_text(html) == "def f():\n    return  1"


def test_script_and_style_are_dropped() -> None:
    html = "<p>safe</p><script>alert('x')</script><style>p { color: red }</style><!-- note -->"
    assert html_to_text(html) == "safe"


def test_paragraphs_and_breaks_become_lines() -> None:
    assert html_to_text("<p>one</p>\n\n<p>two<br>three</p>") == "one\ntwo\nthree"


def test_spoiler_content_stays_hidden() -> None:
    html = (
        '<div class="spoiler-block"><div class="spoiler-header"><p>Ending</p></div>'
        '<div class="spoiler-content"><p>they win</p></div></div>'
    )
    assert html_to_text(html) == "Ending (…)"


def test_tables_read_row_by_row() -> None:
    html = (
        "<table><thead><tr><th>name</th><th>size</th></tr></thead>"
        "<tbody><tr><td>logo.svg</td><td>4 KB</td></tr></tbody></table><p>done</p>"
    )
    assert html_to_text(html) == "name | size\nlogo.svg | 4 KB\ndone"


def test_math_reads_as_its_tex_source() -> None:
    html = (
        '<p>Area is <span class="katex"><span class="katex-mathml"><math><semantics>'
        "<mrow><mi>π</mi><msup><mi>r</mi><mn>2</mn></msup></mrow>"
        '<annotation encoding="application/x-tex">\\pi r^2</annotation></semantics>'
        '</math></span><span class="katex-html" aria-hidden="true">πr2</span></span></p>'
    )
    assert html_to_text(html) == "Area is $$\\pi r^2$$"


def test_stray_content_in_lists_and_items_outside_lists_keep_their_lines() -> None:
    assert html_to_text("<ul>loose text<li>one</li><p>para</p></ul>") == (
        "loose text\n- one\npara"
    )
    assert html_to_text("<li>alone</li><p>next</p>") == "- alone\nnext"


def test_list_items_with_paragraphs_and_quotes() -> None:
    html = (
        "<ol><li><p>first</p><p>more</p></li>"
        "<li><blockquote><p>quoted</p></blockquote></li></ol>"
    )
    assert html_to_text(html) == "1. first\n  more\n2. > quoted"


def test_text_inside_an_emoji_or_code_block_never_includes_scripts() -> None:
    html = (
        '<span class="emoji" title="x"><script>steal()</script></span>'
        "<pre>a<style>p {}</style>b</pre>"
    )
    assert html_to_text(html) == ":x:\nab"


def test_a_charset_declared_in_the_message_does_not_change_how_it_is_read() -> None:
    assert html_to_text('<meta charset="iso-8859-1"><p>café ☕</p>') == "café ☕"


def test_hostile_input_renders_without_error() -> None:
    # Nesting deep enough to exhaust a recursive walker: what comes before it stays,
    # reading stops at the depth limit, and what is within it still renders.
    assert html_to_text("<p>before</p>" + "<b>" * 5000 + "x") == "before"
    assert html_to_text("<blockquote>" * 3000 + "</blockquote>" * 3000 + "after") == ""
    assert html_to_text("<blockquote>" * 200 + "deep") == "> " * 199 + "> deep"
    assert html_to_text("a\x00b") == "a\ufffdb"
    assert html_to_text("lone \ud800 surrogate") == "lone ? surrogate"
    assert html_to_text("") == ""
    assert html_to_text("<!-- only a comment -->") == ""


def test_truncate() -> None:
    assert truncate("short") == ("short", False)
    assert truncate("a" * 200) == ("a" * 200, False)
    assert truncate("a" * 201) == ("a" * 200 + "…", True)
    assert truncate("abcdef", limit=3) == ("abc…", True)


def test_a_remove_that_would_not_fit_clears_the_newest_ids_that_do() -> None:
    wide = Recipient(user_id=7, email="grace@example.com", full_name="Grace",
                     realm_name="🦄" * 200, realm_url="https://chat.acme.test/" + "x" * 470)
    ids = [10**18 + i for i in range(300)]

    payload = apns_remove_payload(wide, ids)

    assert apns_bytes(payload) <= APNS_MAX_PAYLOAD_BYTES
    kept = [int(i) for i in payload["zulip"]["zulip_message_ids"].split(",")]
    assert kept == ids[-len(kept):], "the newest, in order"
    assert 100 < len(kept) < MAX_REMOVE_IDS
    # Nothing else is cut.
    assert payload["zulip"]["realm_name"] == wide.realm_name
    # With room for them, the 200 newest as before.
    short = [10**9 + i for i in range(300)]
    assert apns_remove_payload(ME, short)["zulip"]["zulip_message_ids"] == \
        ",".join(str(i) for i in short[-MAX_REMOVE_IDS:])
