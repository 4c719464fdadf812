"""The MIME structure of a digest, built directly on `email.message.Message`.

A flush renders and serialises thousands of emails a second, and the standard
library's general machinery costs more than the rendering itself: `set_charset`
re-parses the Content-Type it has just written, the generator compiles a fresh regular
expression per multipart boundary to check it against the body, and compat32 folds
every header through `email.header.Header` even when it fits on one line. What is
built here is the same MIME a mail client sees, with those costs taken out:

- text parts carry their headers as written and a body quoted-printable encoded by
  `binascii` (C code);
- the multipart boundary contains ``=_``, which quoted-printable output cannot
  contain, so it needs no check against the parts;
- `DIGEST_POLICY` writes a header that is ASCII and fits in a line as it is, and
  leaves everything else to compat32's own folding.
"""

from __future__ import annotations

import binascii
import itertools
import os
from email._policybase import Compat32
from email.message import Message
from typing import Any

# RFC 5322's recommended line length, which compat32 folds to.
MAX_LINE_LENGTH = 78
# Boundaries: a per-process random part and a counter, so each email's is unique.
_BOUNDARY_PREFIX = f"=_herald_{os.urandom(8).hex()}"
_boundary_counter = itertools.count(1)


class _DigestPolicy(Compat32):
    """compat32 with CRLF line ends and a fast path for headers that need no folding."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if (
            isinstance(value, str)
            and value.isascii()
            and len(name) + 2 + len(value) <= (self.max_line_length or MAX_LINE_LENGTH)
            and "\r" not in value
            and "\n" not in value
        ):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)  # type: ignore[misc,no-any-return]


# The policy every digest is built with: what SMTP and the outbox both write.
DIGEST_POLICY = _DigestPolicy(linesep="\r\n", mangle_from_=False)


def new_boundary() -> str:
    """A multipart boundary that no quoted-printable part can contain."""
    return f"{_BOUNDARY_PREFIX}_{next(_boundary_counter)}"


def multipart_alternative() -> Message:
    """An empty ``multipart/alternative`` message with its boundary already set."""
    message = Message(policy=DIGEST_POLICY)
    message["Content-Type"] = f'multipart/alternative; boundary="{new_boundary()}"'
    message["MIME-Version"] = "1.0"
    return message


def text_part(body: str, subtype: str) -> Message:
    """A ``text/{subtype}`` part: UTF-8, quoted-printable."""
    part = Message(policy=DIGEST_POLICY)
    part["Content-Type"] = f'text/{subtype}; charset="utf-8"'
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(binascii.b2a_qp(body.encode("utf-8"), istext=True).decode("ascii"))
    return part
