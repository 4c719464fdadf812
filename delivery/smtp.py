"""Sending emails: over SMTP (`SmtpMailer`) or into a directory of .eml files (`OutboxMailer`).

Both implement the `Mailer` protocol: ``send(message)`` returns when the message is
accepted (by the SMTP server, or durably on disk) and raises
`TransientDeliveryError` / `PermanentDeliveryError` otherwise.

How SMTP failures are classified:

- connection refused, timeouts, TLS and network errors, a dropped connection, any
  4xx reply, and failures to set up the session (greeting, EHLO, STARTTLS, AUTH) are
  transient: they are about the server or its configuration, not this message, and a
  later try (after an operator fixes a password, say) can succeed;
- a 5xx reply to MAIL FROM, RCPT TO or DATA (``550`` unknown user, ``554`` rejected
  content, ...) is permanent: the same message will be refused again.

Neither message content nor passwords are ever logged; errors carry the server's
reply code and text, with control characters left out: the text ends up in logs and
dead-letter reasons, and PostgreSQL cannot store a NUL.
"""

from __future__ import annotations

import itertools
import logging
import os
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from datetime import UTC, datetime
from email.message import Message as MimeMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from delivery.outcomes import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from settings import SmtpTarget

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

logger = logging.getLogger(__name__)

# Seconds to wait for the server on connect and on each reply.
DEFAULT_SMTP_TIMEOUT = 30.0
# SMTP reply code telling the client the server is closing the connection.
SERVICE_NOT_AVAILABLE = 421
# Suffix of a finished outbox file; temporary files never carry it.
EML_SUFFIX = ".eml"


class Mailer(Protocol):
    """Anything that can send one email."""

    def send(self, message: MimeMessage) -> None:
        """Deliver `message` or raise `TransientDeliveryError` / `PermanentDeliveryError`."""
        ...


# C0 control characters and DEL, each read as a space: a server's reply is stored as
# a dead letter's reason, which PostgreSQL refuses outright with a NUL in it, and
# printed in logs and listings, which the others garble.
_CONTROL_AS_SPACE = dict.fromkeys([*range(0x20), 0x7F], " ")


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.translate(_CONTROL_AS_SPACE).split())


def _by_code(code: int, reason: str) -> DeliveryError:
    """4xx (and anything odd) is worth retrying; 5xx is not."""
    if 500 <= code < 600:
        return PermanentDeliveryError(reason)
    return TransientDeliveryError(reason)


class _Smtp(smtplib.SMTP):
    """An SMTP connection that notes when a message's DATA has begun: from then on
    the server may have the message, whatever becomes of the connection."""

    data_begun = False

    def data(self, msg: ReadableBuffer | str) -> tuple[int, bytes]:
        self.data_begun = True
        return super().data(msg)


class _SmtpSsl(smtplib.SMTP_SSL, _Smtp):
    """`_Smtp` over implicit TLS."""


class _SetupError(Exception):
    """Connecting, greeting, STARTTLS or AUTH failed: never about the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SmtpMailer:
    """Sends emails through one SMTP server, reusing one connection across sends.

    Thread-safe: sends from several threads take turns on the connection. A connection
    the server dropped while idle is noticed on the next send, which reconnects once
    and sends again.

    Parameters:
      target: where and how to connect (`settings.SmtpTarget`): plain, STARTTLS
        (``target.starttls``) or implicit TLS (``target.use_tls``); AUTH with
        ``target.username`` / ``target.password`` when a username is given
        (percent-decoded, as they come from a URL).
      timeout: seconds to wait for the server on connect and on each reply.
      ssl_context: the TLS client context; default the system trust store with
        hostname checks.
      local_hostname: the name given in EHLO; default this host's fully qualified name.
    """

    def __init__(
        self,
        target: SmtpTarget,
        timeout: float = DEFAULT_SMTP_TIMEOUT,
        *,
        ssl_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._ssl_context = ssl_context or ssl.create_default_context()
        # Looked up once: getfqdn() may do a DNS query.
        self._local_hostname = local_hostname or socket.getfqdn()
        self._username = unquote(target.username) if target.username else None
        self._password = unquote(target.password) if target.password else ""
        self._lock = threading.Lock()
        self._conn: _Smtp | None = None
        # Connections opened so far; lets callers and tests see reuse.
        self.connections_opened = 0

    def __repr__(self) -> str:  # the target's repr hides the password
        return f"SmtpMailer({self._target!r})"

    def __enter__(self) -> SmtpMailer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Connection management -------------------------------------------------------

    def _open(self) -> _Smtp:
        target = self._target
        where = f"{target.host}:{target.port}"
        conn: _Smtp | None = None
        try:
            if target.use_tls:
                conn = _SmtpSsl(
                    target.host,
                    target.port,
                    local_hostname=self._local_hostname,
                    timeout=self._timeout,
                    context=self._ssl_context,
                )
            else:
                conn = _Smtp(
                    target.host,
                    target.port,
                    local_hostname=self._local_hostname,
                    timeout=self._timeout,
                )
            conn.ehlo()
            if target.starttls and not target.use_tls:
                conn.starttls(context=self._ssl_context)
                conn.ehlo()
            if self._username:
                conn.login(self._username, self._password)
        except smtplib.SMTPAuthenticationError as exc:
            self._discard(conn)
            raise _SetupError(
                f"SMTP AUTH failed at {where}: {exc.smtp_code} {_reply_text(exc.smtp_error)}"
            ) from None
        except smtplib.SMTPResponseException as exc:
            self._discard(conn)
            raise _SetupError(
                f"SMTP session setup failed at {where}: "
                f"{exc.smtp_code} {_reply_text(exc.smtp_error)}"
            ) from None
        except ssl.SSLError as exc:
            self._discard(conn)
            raise _SetupError(f"TLS with {where} failed: {exc.reason or exc}") from None
        except (smtplib.SMTPException, OSError) as exc:
            # Refused, timed out, reset, unreachable, STARTTLS/AUTH not offered, ...
            self._discard(conn)
            raise _SetupError(f"cannot connect to SMTP {where}: {_describe(exc)}") from None
        self.connections_opened += 1
        return conn

    @staticmethod
    def _discard(conn: smtplib.SMTP | None) -> None:
        if conn is None:
            return
        try:
            conn.close()
        except OSError:
            pass

    def _drop(self) -> None:
        self._discard(self._conn)
        self._conn = None

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                self._discard(conn)

    # Sending -----------------------------------------------------------------------

    def send(self, message: MimeMessage) -> None:
        """Send `message` to the addresses in its To/Cc/Bcc headers.

        Raises `TransientDeliveryError` or `PermanentDeliveryError` (see the module
        docstring); on success the server has accepted the message.
        """
        with self._lock:
            # A reused connection may have been closed by the server while idle: that
            # shows up as a disconnect (or 421) on the first command, so try once more
            # on a fresh connection. A fresh connection gets no second chance, and
            # neither does a message whose DATA had begun: a read timeout waiting for
            # the answer to its final "." is a disconnect too, and the server may have
            # queued the message already.
            for attempt in itertools.count():
                reused = self._conn is not None
                try:
                    conn = self._conn or self._open()
                except _SetupError as exc:
                    raise TransientDeliveryError(exc.reason) from None
                self._conn = conn
                conn.data_begun = False
                try:
                    refused = conn.send_message(message)
                except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                    self._drop()
                    if conn.data_begun:
                        raise TransientDeliveryError(
                            f"SMTP server disconnected during DATA, and may have accepted "
                            f"the message: {exc}"
                        ) from None
                    if reused and attempt == 0:
                        logger.debug("SMTP connection was closed by the server; reconnecting")
                        continue
                    raise TransientDeliveryError(f"SMTP server disconnected: {exc}") from None
                except smtplib.SMTPRecipientsRefused as exc:
                    self._drop()
                    raise _refused(exc.recipients) from None
                except smtplib.SMTPResponseException as exc:
                    self._drop()
                    if exc.smtp_code == SERVICE_NOT_AVAILABLE and reused and attempt == 0:
                        continue
                    raise _by_code(exc.smtp_code, _response_reason(exc)) from None
                except smtplib.SMTPNotSupportedError as exc:
                    # E.g. a non-ASCII address to a server without SMTPUTF8.
                    self._drop()
                    raise PermanentDeliveryError(
                        f"SMTP server cannot take this message: {exc}"
                    ) from None
                except (smtplib.SMTPException, OSError) as exc:
                    self._drop()
                    raise TransientDeliveryError(f"SMTP send failed: {_describe(exc)}") from None
                if refused:
                    # Some recipients were refused and the rest accepted: herald sends one
                    # recipient per email, so this only happens with hand-made messages.
                    raise _refused(refused)
                logger.debug("SMTP accepted message %s", message.get("Message-ID", "?"))
                return


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) else text


def _response_reason(exc: smtplib.SMTPResponseException) -> str:
    stage = {
        smtplib.SMTPSenderRefused: "MAIL FROM",
        smtplib.SMTPDataError: "DATA",
    }.get(type(exc), "SMTP")
    return f"SMTP {exc.smtp_code} on {stage}: {_reply_text(exc.smtp_error)}"


def _refused(recipients: dict[str, tuple[int, bytes]]) -> DeliveryError:
    """One error for refused recipients: permanent if any refusal was a 5xx."""
    code, reply = max(recipients.values(), key=lambda answer: answer[0])
    return _by_code(code, f"SMTP {code} on RCPT: {_reply_text(reply)}")


def _wire_policy(message: MimeMessage) -> Any:
    """The message's own policy, writing CRLF line ends and no ``>From`` mangling, as
    SMTP would put it on the wire."""
    policy = message.policy
    if policy.linesep == "\r\n" and not policy.mangle_from_:
        return policy
    return policy.clone(linesep="\r\n", mangle_from_=False)


class OutboxMailer:
    """Writes each email as a ``.eml`` file in a directory instead of sending it.

    Files appear atomically (written to a temporary name, flushed to disk, then
    renamed) and are named ``<UTC timestamp>-<sequence>-<random>.eml``, so a directory
    listing sorts in send order and nothing reads a half-written file.

    Parameters:
      directory: where to write; created (with parents) if missing.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._last_ns = 0
        self._sequence = 0

    def __repr__(self) -> str:
        return f"OutboxMailer({str(self.directory)!r})"

    def _next_name(self) -> str:
        with self._lock:
            # Strictly increasing within the process, even if the clock stalls or steps back.
            now_ns = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = now_ns
            self._sequence += 1
            sequence = self._sequence
        seconds, nanos = divmod(now_ns, 1_000_000_000)
        stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y%m%dT%H%M%S")
        return f"{stamp}.{nanos:09d}Z-{sequence:08d}-{os.urandom(4).hex()}{EML_SUFFIX}"

    def send(self, message: MimeMessage) -> None:
        """Write `message` as a new ``.eml`` file; raises `TransientDeliveryError` on I/O errors."""
        try:
            data = message.as_bytes(policy=_wire_policy(message))
        except (UnicodeError, ValueError) as exc:
            raise PermanentDeliveryError(f"email cannot be serialised: {exc}") from None
        final = self.directory / self._next_name()
        try:
            fd, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp_name, final)
            except BaseException:
                try:
                    os.unlink(temp_name)
                except OSError:
                    pass
                raise
        except OSError as exc:
            raise TransientDeliveryError(
                f"cannot write to outbox {self.directory}: {exc}"
            ) from None
        logger.debug("wrote email %s to %s", message.get("Message-ID", "?"), final.name)

    def close(self) -> None:
        """Nothing to release; present so both mailers can be closed alike."""
