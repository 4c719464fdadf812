"""Sending rendered digests off the actor pool.

SMTP is slow and blocking; a UserBatchActor must never hold a pool thread through
an SMTP conversation, so it hands its emails to `MailDispatcher`, whose own threads
each keep one SMTP connection (or write to the outbox), and hears back through the
`Delivery` it handed over with them.

When the worker stops, emails whose sending has not begun never start, and those
being sent are waited for, for a bounded time: each `Delivery` is told which it was.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message as MimeMessage
from typing import Protocol

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from delivery.smtp import Mailer, OutboxMailer, SmtpMailer
from settings import Settings

logger = logging.getLogger("herald.email")

# Threads (and so SMTP connections) sending emails at once, per process.
MAIL_THREADS = 8
# How long a stopping dispatcher waits for the emails being sent (seconds): the bound a
# draining worker gives the messages in hand by default (`DRAIN_SECONDS`) and the
# actor tree its routers (`actors/tree.py`).
SEND_DRAIN_SECONDS = 60.0


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


# Reason given for an email not sent because its rows were no longer its batch's.
REASON_TAKEN_OVER = "not sent: the claim's lease ran out and another flush took its rows"


class Delivery(Protocol):
    """What the sender of some emails hears about them: `sent` or `not_sent`, once;
    `still_sending` first when the stop stops waiting for them. Asked `hold` before
    each email."""

    def hold(self, message_ids: list[int]) -> bool:
        """Just before the email of these rows is sent (on the mail thread): whether
        they are still this delivery's to send. An email may wait on a busy dispatcher
        past its claim's lease, and another worker may then have sent them."""

    def sent(self, outcomes: list[SendOutcome]) -> None:
        """Every email was tried; `outcomes` in order (on the mail thread)."""

    def not_sent(self) -> None:
        """The dispatcher stopped before the first email went: none was tried (on the
        thread that stops the dispatcher, or the one that handed the emails over)."""

    def still_sending(self, waited: float) -> None:
        """The dispatcher stopped waiting for these emails after `waited` seconds of
        its stop (on the thread that stops it); `sent` may still follow."""


class MailDispatcher:
    """Sends emails on its own threads and reports back through their `Delivery`.

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
        # Handed over and not finished yet, so that `shutdown` can tell each one how
        # it ended; and whether `shutdown` has begun. Both under the lock.
        self._lock = threading.Lock()
        self._jobs: dict[Future[None], Delivery] = {}
        self._stopping = False

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

    def send(self, emails: list[tuple[list[int], MimeMessage]], delivery: Delivery) -> None:
        """Send `emails` in order on a mail thread, then tell `delivery` (any thread).

        Once `shutdown` has begun nothing more starts: `delivery.not_sent()` is called
        at once, on the calling thread.
        """
        with self._lock:
            stopping = self._stopping
            if not stopping:
                job = self._pool.submit(self._send_all, emails, delivery)
                self._jobs[job] = delivery
        if stopping:
            delivery.not_sent()
            return
        job.add_done_callback(self._forget)

    def _forget(self, job: Future[None]) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def _send_all(self, emails: list[tuple[list[int], MimeMessage]], delivery: Delivery) -> None:
        outcomes: list[SendOutcome] = []
        for ids, message in emails:
            try:
                if not delivery.hold(ids):
                    logger.warning("email of %d row(s) %s", len(ids), REASON_TAKEN_OVER)
                    outcomes.append(SendOutcome(ids, "transient", REASON_TAKEN_OVER))
                    continue
                self._mailer().send(message)
                outcomes.append(SendOutcome(ids, "sent"))
            except TransientDeliveryError as exc:
                outcomes.append(SendOutcome(ids, "transient", exc.reason))
            except PermanentDeliveryError as exc:
                outcomes.append(SendOutcome(ids, "permanent", exc.reason))
            except Exception as exc:  # an unexpected failure is retried, not lost
                logger.exception("unexpected error sending an email")
                outcomes.append(SendOutcome(ids, "transient", f"{type(exc).__name__}: {exc}"))
        try:
            delivery.sent(outcomes)
        except Exception:  # raised here, it would only be kept in the job's future
            logger.exception("reporting sent emails failed")

    def shutdown(self, wait: bool = True) -> None:
        """Stop sending (called once, at shutdown, after the actors have stopped; on
        the thread that stops the worker).

        Emails not started yet never start: their deliveries are told `not_sent`.
        With `wait`, those being sent are waited for, at most `SEND_DRAIN_SECONDS`; any
        still being sent then are told `still_sending`, and left to finish on their
        own threads.
        """
        with self._lock:
            self._stopping = True
            jobs = dict(self._jobs)
        in_flight: list[Future[None]] = []
        for job, delivery in jobs.items():
            if job.cancel():
                delivery.not_sent()
            else:
                in_flight.append(job)
        if in_flight and wait:
            logger.info("waiting up to %.0fs for %d email send(s) in flight",
                        SEND_DRAIN_SECONDS, len(in_flight))
            _, late = concurrent.futures.wait(in_flight, timeout=SEND_DRAIN_SECONDS)
            for job in late:
                jobs[job].still_sending(SEND_DRAIN_SECONDS)
        self._pool.shutdown(wait=False)
