"""Sending rendered digests off the actor pool.

SMTP is slow and blocking; a UserBatchActor must never hold a pool thread through
an SMTP conversation, so it hands its emails to `MailDispatcher`, whose own threads
each keep one SMTP connection (or write to the outbox), and hears back by message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message as MimeMessage

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from delivery.smtp import Mailer, OutboxMailer, SmtpMailer
from settings import Settings

logger = logging.getLogger("herald.email")

# Threads (and so SMTP connections) sending emails at once, per process.
MAIL_THREADS = 8


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one email (one conversation) of a batch.

    Parameters:
      message_ids: the batch rows this email covered.
      status: "sent", "transient" or "permanent".
      reason: the server's words on failure.
    """

    message_ids: list[int]
    status: str
    reason: str = ""


class MailDispatcher:
    """Sends emails on its own threads and reports back through a callback.

    Parameters:
      settings: `SMTP_URL` (else the `OUTBOX_DIR` outbox) and the SMTP timeout.
      mailer_factory: optional; builds one mailer per sending thread (tests).
    """

    def __init__(
        self, settings: Settings, mailer_factory: Callable[[], Mailer] | None = None
    ) -> None:
        self.settings = settings
        self._factory = mailer_factory or self._default_mailer
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(MAIL_THREADS, thread_name_prefix="herald-mail")

    def _default_mailer(self) -> Mailer:
        target = self.settings.smtp
        if target is None:
            return OutboxMailer(self.settings.OUTBOX_DIR)
        return SmtpMailer(target, timeout=self.settings.SMTP_TIMEOUT_SECONDS)

    def _mailer(self) -> Mailer:
        mailer = getattr(self._local, "mailer", None)
        if mailer is None:
            mailer = self._local.mailer = self._factory()
        return mailer

    def send(
        self,
        emails: list[tuple[list[int], MimeMessage]],
        done: Callable[[list[SendOutcome]], None],
    ) -> None:
        """Send `emails` in order on a mail thread; then call `done` there with outcomes."""
        self._pool.submit(self._send_all, emails, done)

    def _send_all(
        self,
        emails: list[tuple[list[int], MimeMessage]],
        done: Callable[[list[SendOutcome]], None],
    ) -> None:
        outcomes: list[SendOutcome] = []
        for ids, message in emails:
            try:
                self._mailer().send(message)
                outcomes.append(SendOutcome(ids, "sent"))
            except TransientDeliveryError as exc:
                outcomes.append(SendOutcome(ids, "transient", exc.reason))
            except PermanentDeliveryError as exc:
                outcomes.append(SendOutcome(ids, "permanent", exc.reason))
            except Exception as exc:  # an unexpected failure is retried, not lost
                logger.exception("unexpected error sending an email")
                outcomes.append(SendOutcome(ids, "transient", f"{type(exc).__name__}: {exc}"))
        done(outcomes)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)
