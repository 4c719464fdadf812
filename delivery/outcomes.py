"""What a provider said about one send, in terms the push and email actors act on."""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import time
from dataclasses import dataclass


class Outcome(enum.Enum):
    """How one send to one device (or one email) ended."""

    # The provider accepted it.
    DELIVERED = "delivered"
    # The device token is dead (Unregistered, BadDeviceToken, UNREGISTERED, ...): delete it.
    INVALID_DEVICE = "invalid_device"
    # Try again later: timeout, connection error, 5xx, 429, UNAVAILABLE, SMTP 4xx, ...
    TRANSIENT = "transient"
    # Will never succeed as sent: a 4xx that is not about the device, SMTP 5xx, ...
    PERMANENT = "permanent"


@dataclass(frozen=True)
class SendResult:
    """One provider answer.

    Parameters:
      outcome: what to do next.
      reason: the provider's own words (e.g. ``"BadDeviceToken"``, ``"HTTP 503"``).
      retry_after: seconds the provider asked us to wait (``Retry-After``), if any.
    """

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.DELIVERED


DELIVERED = SendResult(Outcome.DELIVERED)


class DeliveryError(Exception):
    """A send failed; `reason` is safe to log and to store in the dead-letter table."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TransientDeliveryError(DeliveryError):
    """Worth retrying later."""


class PermanentDeliveryError(DeliveryError):
    """Retrying will not help."""


# The longest wait a provider's Retry-After can impose; longer asks are cut to this.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), at most
    `MAX_RETRY_AFTER_SECONDS`; None if absent or malformed (negative, NaN, infinite)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        if seconds < 0:  # delta-seconds are never negative: a malformed header
            return None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when.tzinfo is None:
            # RFC 9110 dates are GMT; an asctime() one parses without a zone.
            when = when.replace(tzinfo=datetime.UTC)
        try:
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (OverflowError, ValueError, OSError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)
