"""Plain text from a chat message's rendered HTML, for push bodies and text emails.

`html_to_text` parses the HTML with a real parser (libxml2's, through lxml) and walks
the tree without recursion, so no nesting depth can exhaust the stack. It keeps what a
reader needs on a lock screen or in a text-only mail client:

- user and group mentions, links and inline code as their text;
- emoji as their name (``:smile:``): the ``alt`` of an emoji image, the text or
  ``title`` of an emoji span;
- other images as their ``alt`` text (nothing when they have none);
- paragraphs, headings, table rows and line breaks as separate lines;
- lists as one line per item (``- item`` or ``1. item``), nested lists indented;
  an ordered list counts from its ``start`` when that is a plain decimal integer;
- block quotes as lines prefixed with ``> ``;
- code blocks (``<pre>``) verbatim, line breaks and indentation included;
- spoilers as their header followed by ``(…)``, so hidden text stays hidden;
- KaTeX math as its TeX source;
- nothing at all from ``<script>``, ``<style>`` and similar non-content elements.

Runs of whitespace outside code blocks collapse to one space, and empty lines are
dropped. Like a browser, the parser repairs broken markup and reads NUL as U+FFFD.
It stops reading at nesting 256 elements deep (no chat message comes near that), and
the rest of such a message is left out. `truncate` then cuts the text the way the push
contract says: at 200 characters followed by ``…``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lxml import etree

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
_CELL_TAGS = frozenset({"td", "th"})
# Only ASCII whitespace collapses; a no-break space is deliberate.
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
# Indentation per nesting level of a list.
_LIST_INDENT = "  "
# The most digits an ordered list's ``start`` may have; a longer one is ignored, since
# no list needs it and `int` refuses (or is slow on) numbers thousands of digits long.
_MAX_LIST_START_DIGITS = 9
# An ordered list's ``start``: an optional sign and ASCII digits only. `str.isdigit`
# would also take superscripts and other scripts' digits, which `int` refuses.
_LIST_START = re.compile(rf"[+-]?[0-9]{{1,{_MAX_LIST_START_DIGITS}}}")
# What HTML counts as whitespace around an attribute's value.
_HTML_SPACE = " \t\n\r\f"
# Comments and processing instructions never reach the tree. The text goes in as
# UTF-8 bytes with the encoding stated, so a <meta charset> inside a message cannot
# make the parser read it as something else.
_PARSER = etree.HTMLParser(
    encoding="utf-8", remove_comments=True, remove_pis=True, no_network=True
)

# What an element's end does with what its start opened (see `_Walk`).
_END_BLOCK = "block"  # end the current line
_END_QUOTE = "quote"  # a block quote's lines, each after "> "
_END_LIST = "list"  # a list's lines
_END_ITEM = "item"  # a list item's lines, handed to its list for a marker
_END_IN_LIST = "in-list"  # lines of other content directly inside a list
_END_LONE_ITEM = "lone-item"  # an item outside any list: "- " before each line


class _Lines:
    """Collects output: finished lines plus the inline text of the line being built."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._inline: list[str] = []

    def text(self, value: str) -> None:
        self._inline.append(value)

    def end_line(self) -> None:
        if not self._inline:
            return
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


class _List(_Lines):
    """A ``<ul>``/``<ol>``'s lines: one per item, numbered from ``start`` when ordered."""

    def __init__(self, element: etree._Element) -> None:
        super().__init__()
        self.ordered = element.tag == "ol"
        self.number = _list_start(_attr(element, "start"))

    def text(self, value: str) -> None:
        # Stray text directly inside a list still counts as content: a line of its own.
        line = _WHITESPACE.sub(" ", value).strip()
        if line:
            self.lines.append(line)

    def add_item(self, item: list[str]) -> None:
        marker = f"{self.number}. " if self.ordered else "- "
        self.number += 1
        item = item or [""]
        self.lines.append(marker + item[0])
        # Continuation lines (wrapped paragraphs, nested lists) sit under the text.
        self.lines.extend(_LIST_INDENT + line for line in item[1:])


def _list_start(value: str) -> int:
    """The first number of an ordered list, from its ``start`` attribute.

    The attribute comes from message HTML, so it can hold anything; a value that is
    not a plain decimal integer numbers the list from 1, as if it were absent, rather
    than failing the push or email the message is in.
    """
    value = value.strip(_HTML_SPACE)
    return int(value) if _LIST_START.fullmatch(value) else 1


def _attr(element: etree._Element, name: str) -> str:
    return element.get(name) or ""


def _classes(element: etree._Element) -> list[str]:
    return _attr(element, "class").split()


def _text_of(element: etree._Element) -> str:
    """All text inside `element`, but none from elements that are never content."""
    parts: list[str] = []
    walker = etree.iterwalk(element, events=("start", "end"))
    for event, inner in walker:
        if event == "start":
            if inner is not element and _skipped(inner):
                walker.skip_subtree()
            elif inner.text:
                parts.append(inner.text)
        elif inner is not element and inner.tail:
            parts.append(inner.tail)
    return "".join(parts)


def _skipped(element: etree._Element) -> bool:
    return not isinstance(element.tag, str) or element.tag in _SKIPPED_TAGS


def _emoji_text(element: etree._Element) -> str:
    if element.tag == "img":
        return _attr(element, "alt") or _colon_name(_attr(element, "title"))
    text = _text_of(element)
    if text.strip():
        return text
    return _colon_name(_attr(element, "title") or _attr(element, "aria-label"))


def _colon_name(name: str) -> str:
    name = name.strip()
    if not name:
        return ""
    if name.startswith(":") and name.endswith(":") and len(name) > 1:
        return name
    return ":" + name.replace(" ", "_") + ":"


def _katex_source(element: etree._Element) -> str | None:
    for annotation in element.iter("annotation"):
        if annotation.get("encoding") == "application/x-tex":
            return "$$" + _text_of(annotation).strip() + "$$"
    return None


def _spoiler_title(element: etree._Element) -> str:
    for descendant in element.iterdescendants():
        if "spoiler-header" in _classes(descendant):
            return " ".join(_Walk(descendant).lines())
    return ""


class _Walk:
    """Renders one element's content to lines, walking its tree without recursion.

    Parameters:
      root: the element whose content (not the element itself, nor its tail) is wanted.

    `frames` holds the output being built: nested blocks that are rendered apart (a
    quote, a list, an item) push a frame and pop it when they end. `ends` holds, per
    open element, what its end must do, innermost last.
    """

    def __init__(self, root: etree._Element) -> None:
        self.root = root
        self.frames: list[_Lines] = [_Lines()]
        self.ends: list[list[str]] = []

    def lines(self) -> list[str]:
        walker = etree.iterwalk(self.root, events=("start", "end"))
        for event, element in walker:
            if element is self.root:
                if event == "start" and element.text:
                    self.frames[-1].text(element.text)
            elif event == "start":
                ends: list[str] = []
                self.ends.append(ends)
                if self._start(element, ends):
                    walker.skip_subtree()
            else:
                for end in reversed(self.ends.pop()):
                    self._end(end)
                if element.tail:
                    self.frames[-1].text(element.tail)
        return self.frames[0].finish()

    def _push(self, frame: _Lines, ends: list[str], end: str) -> None:
        self.frames.append(frame)
        ends.append(end)

    def _start(self, element: etree._Element, ends: list[str]) -> bool:
        """Handle an element's start; True when its content is done with (skip it)."""
        if _skipped(element):
            return True
        name = element.tag
        out = self.frames[-1]
        if isinstance(out, _List):
            # A list's own children render apart: items get their marker at the end.
            if name == "li":
                self._push(_Lines(), ends, _END_ITEM)
                out = self.frames[-1]
                if element.text:
                    out.text(element.text)
                return False
            self._push(_Lines(), ends, _END_IN_LIST)
            out = self.frames[-1]
        classes = _classes(element)
        if "emoji" in classes:
            out.text(_emoji_text(element))
            return True
        if "katex" in classes or "katex-display" in classes:
            source = _katex_source(element)
            if source is not None:
                out.text(source)
                return True
        elif "spoiler-block" in classes:
            out.add_lines([f"{_spoiler_title(element)} {SPOILER_MARKER}".strip()])
            return True
        if name == "img":
            out.text(_attr(element, "alt"))
            return True
        if name == "br":
            out.end_line()
            return True
        if name == "pre":
            code = _text_of(element).strip("\n")
            out.add_lines(line.rstrip() for line in code.split("\n"))
            return True
        if name == "blockquote":
            self._push(_Lines(), ends, _END_QUOTE)
        elif name in ("ul", "ol"):
            self._push(_List(element), ends, _END_LIST)
        elif name == "li":
            self._push(_Lines(), ends, _END_LONE_ITEM)
        elif name in _CELL_TAGS:
            if any(s.tag in _CELL_TAGS for s in element.itersiblings(preceding=True)):
                out.text(_CELL_SEPARATOR)
        elif name in _BLOCK_TAGS:
            out.end_line()
            ends.append(_END_BLOCK)
        if element.text:
            self.frames[-1].text(element.text)
        return False

    def _end(self, end: str) -> None:
        if end == _END_BLOCK:
            self.frames[-1].end_line()
            return
        lines = self.frames.pop().finish()
        out = self.frames[-1]
        if end == _END_QUOTE:
            out.add_lines(f"> {line}" if line else ">" for line in lines)
        elif end == _END_LONE_ITEM:
            out.add_lines(f"- {line}" for line in lines)
        elif end == _END_ITEM and isinstance(out, _List):
            out.add_item(lines)
        else:
            out.add_lines(lines)


def html_to_text(html: str) -> str:
    """Render a message's HTML as plain text (see the module docstring for the rules).

    Parameters:
      html: the message's rendered HTML, possibly hostile; never executed.
    """
    # Lone surrogates (valid in a JSON string, not in UTF-8) become "?".
    data = html.encode("utf-8", "replace")
    if not data.strip():
        return ""
    root = etree.fromstring(data, _PARSER)
    if root is None:
        return ""
    return "\n".join(_Walk(root).lines()).strip()


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
