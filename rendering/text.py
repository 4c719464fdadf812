"""Plain text from a chat message's rendered HTML, for push bodies and text emails.

`html_to_text` walks the HTML with a real parser (BeautifulSoup on Python's
``html.parser``) and keeps what a reader needs on a lock screen or in a text-only mail
client:

- user and group mentions, links and inline code as their text;
- emoji as their name (``:smile:``): the ``alt`` of an emoji image, the text or
  ``title`` of an emoji span;
- other images as their ``alt`` text (nothing when they have none);
- paragraphs, headings, table rows and line breaks as separate lines;
- lists as one line per item (``- item`` or ``1. item``), nested lists indented;
- block quotes as lines prefixed with ``> ``;
- code blocks (``<pre>``) verbatim, line breaks and indentation included;
- spoilers as their header followed by ``(…)``, so hidden text stays hidden;
- KaTeX math as its TeX source;
- nothing at all from ``<script>``, ``<style>`` and similar non-content elements.

Runs of whitespace outside code blocks collapse to one space, and empty lines are
dropped. `truncate` then cuts the text the way the push contract says: at 200
characters followed by ``…``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bs4 import BeautifulSoup
from bs4.element import (
    CData,
    Comment,
    Declaration,
    Doctype,
    NavigableString,
    PageElement,
    ProcessingInstruction,
    Tag,
)

# The contract's push body limit: "cut at 200 characters + …".
PUSH_TEXT_LIMIT = 200
# Appended to cut text; one character, so the body stays short.
ELLIPSIS = "…"
# Shown instead of a spoiler's hidden content.
SPOILER_MARKER = "(…)"

# Elements whose text is never content a reader should see.
_SKIPPED_TAGS = frozenset(
    {"script", "style", "template", "noscript", "head", "title", "iframe", "object", "svg"}
)
# Elements that start and end a line of their own.
_BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "aside", "header", "footer", "nav", "main",
        "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tfoot", "tr",
        "caption", "figure", "figcaption", "details", "summary", "dl", "dt", "dd",
        "hr", "address", "center", "form", "fieldset",
    }
)  # fmt: skip
# Table cells stay on their row's line, separated by this.
_CELL_SEPARATOR = " | "
# Non-element nodes that carry no visible text.
_INVISIBLE_STRINGS = (Comment, CData, Declaration, Doctype, ProcessingInstruction)
# Only ASCII whitespace collapses; a no-break space is deliberate.
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
# Indentation per nesting level of a list.
_LIST_INDENT = "  "


def _classes(tag: Tag) -> list[str]:
    value = tag.get("class")
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(c) for c in value]


def _attr(tag: Tag, name: str) -> str:
    value = tag.get(name)
    if value is None:
        return ""
    return value if isinstance(value, str) else " ".join(value)


class _Lines:
    """Collects output: finished lines plus the inline text of the line being built."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._inline: list[str] = []

    def text(self, value: str) -> None:
        self._inline.append(value)

    def end_line(self) -> None:
        line = _WHITESPACE.sub(" ", "".join(self._inline)).strip()
        self._inline = []
        if line:
            self.lines.append(line)

    def add_lines(self, lines: Iterable[str]) -> None:
        self.end_line()
        self.lines.extend(lines)

    def finish(self) -> list[str]:
        self.end_line()
        return self.lines


def _emoji_text(tag: Tag) -> str:
    if tag.name == "img":
        return _attr(tag, "alt") or _colon_name(_attr(tag, "title"))
    text = tag.get_text()
    if text.strip():
        return text
    return _colon_name(_attr(tag, "title") or _attr(tag, "aria-label"))


def _colon_name(name: str) -> str:
    name = name.strip()
    if not name:
        return ""
    if name.startswith(":") and name.endswith(":") and len(name) > 1:
        return name
    return ":" + name.replace(" ", "_") + ":"


def _render_children(tag: Tag, out: _Lines) -> None:
    for child in tag.children:
        _render(child, out)


def _render_sub(tag: Tag) -> list[str]:
    sub = _Lines()
    _render_children(tag, sub)
    return sub.finish()


def _render_list(tag: Tag, out: _Lines) -> None:
    ordered = tag.name == "ol"
    start = _attr(tag, "start")
    number = int(start) if start.lstrip("-").isdigit() else 1
    lines: list[str] = []
    for child in tag.children:
        if isinstance(child, Tag) and child.name == "li":
            marker = f"{number}. " if ordered else "- "
            number += 1
            item = _render_sub(child) or [""]
            lines.append(marker + item[0])
            # Continuation lines (wrapped paragraphs, nested lists) sit under the text.
            lines.extend(_LIST_INDENT + line for line in item[1:])
        elif isinstance(child, Tag):
            # Stray content directly inside a list still counts as content.
            lines.extend(_render_sub(child))
        elif (
            isinstance(child, NavigableString)
            and not isinstance(child, _INVISIBLE_STRINGS)
            and child.strip()
        ):
            lines.append(_WHITESPACE.sub(" ", str(child)).strip())
    out.add_lines(lines)


def _render_katex(tag: Tag, out: _Lines) -> None:
    annotation = tag.find("annotation", attrs={"encoding": "application/x-tex"})
    if isinstance(annotation, Tag):
        out.text("$$" + annotation.get_text().strip() + "$$")
    else:
        _render_children(tag, out)


def _render_spoiler(tag: Tag, out: _Lines) -> None:
    header = tag.find(class_="spoiler-header")
    title = " ".join(_render_sub(header)) if isinstance(header, Tag) else ""
    out.add_lines([f"{title} {SPOILER_MARKER}".strip()])


def _render(node: PageElement, out: _Lines) -> None:
    if isinstance(node, NavigableString):
        if not isinstance(node, _INVISIBLE_STRINGS):
            out.text(str(node))
        return
    if not isinstance(node, Tag):
        return
    name = node.name
    classes = _classes(node)
    if name in _SKIPPED_TAGS:
        return
    if "emoji" in classes:
        out.text(_emoji_text(node))
        return
    if "katex" in classes or "katex-display" in classes:
        _render_katex(node, out)
        return
    if "spoiler-block" in classes:
        _render_spoiler(node, out)
        return
    if name == "img":
        out.text(_attr(node, "alt"))
        return
    if name == "br":
        out.end_line()
        return
    if name == "pre":
        code = node.get_text().strip("\n")
        out.add_lines(line.rstrip() for line in code.split("\n"))
        return
    if name == "blockquote":
        quoted = _render_sub(node)
        out.add_lines(f"> {line}" if line else ">" for line in quoted)
        return
    if name in ("ul", "ol"):
        _render_list(node, out)
        return
    if name in ("td", "th"):
        out.text(_CELL_SEPARATOR if node.find_previous_sibling(["td", "th"]) else "")
        _render_children(node, out)
        return
    if name == "li":
        # An item outside any list: still one line of its own.
        out.add_lines(f"- {line}" for line in _render_sub(node))
        return
    if name in _BLOCK_TAGS:
        out.end_line()
        _render_children(node, out)
        out.end_line()
        return
    # Inline elements (a, span, code, strong, mentions, time, ...): their text.
    _render_children(node, out)


def html_to_text(html: str) -> str:
    """Render a message's HTML as plain text (see the module docstring for the rules).

    Parameters:
      html: the message's rendered HTML, possibly hostile; never executed.
    """
    soup = BeautifulSoup(html, "html.parser")
    out = _Lines()
    _render_children(soup, out)
    return "\n".join(out.finish()).strip()


def truncate(text: str, limit: int = PUSH_TEXT_LIMIT) -> tuple[str, bool]:
    """Cut `text` to `limit` characters plus ``…``; returns the text and whether it was cut.

    Parameters:
      text: plain text, e.g. from `html_to_text`.
      limit: characters kept before the ellipsis (the contract's 200 by default).
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if len(text) <= limit:
        return text, False
    return text[:limit] + ELLIPSIS, True
