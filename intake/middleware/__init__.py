"""Cross-cutting intake behaviour as Dramatiq middleware: retries, dead letters, metrics."""

from intake.middleware.metrics import IntakeMetrics
from intake.middleware.retries import RetryWithBackoff

__all__ = ["IntakeMetrics", "RetryWithBackoff"]
