"""herald's Prometheus metrics, defined once and imported where they are counted.

Served by `GET /metrics` (or on `METRICS_PORT`). Labels never carry user data.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_ACCEPTED = Counter(
    "herald_events_accepted_total", "Events accepted by the ingest API and queued", ["queue"]
)
EVENTS_PROCESSED = Counter(
    "herald_events_processed_total", "Queued events whose work finished", ["queue"]
)
MESSAGES_IN_PROGRESS = Gauge(
    "herald_messages_in_progress",
    "Queue messages this process is working on, each holding one of WORKER_THREADS",
    ["queue"],
)
# Buckets for the steps of an event's way through a worker (seconds): fine around the
# milliseconds a healthy push takes, coarse out to the consumers' hand-off timeout.
STEP_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
                0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_WAIT = Histogram(
    "herald_queue_wait_seconds",
    "Time from a queue message's publish to a worker thread starting its first try "
    "(the publishing process's clock against the worker's)",
    ["queue"],
    buckets=STEP_BUCKETS,
)
EVENT_AGE = Histogram(
    "herald_event_age_seconds",
    "Time from a queue message's first publish to the end of its work, retries included "
    "(the publishing process's clock against the worker's)",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
             3600),
)
EVENTS_RETRIED = Counter(
    "herald_events_retried_total", "Queued events scheduled for another try", ["queue"]
)
EVENTS_FAILED = Counter(
    "herald_events_failed_total", "Queued events given up on (dead-lettered)", ["queue"]
)
DEAD_LETTERS = Counter(
    "herald_dead_letters_total", "Rows written to the dead-letter store", ["kind"]
)
ACTOR_RESTARTS = Counter(
    "herald_actor_restarts_total", "Supervised actors restarted after a crash", ["actor"]
)
PENDING_EMAIL_USERS = Gauge(
    "herald_pending_email_users", "Users with an open email batch in this process"
)
EMAILS_SENT = Counter("herald_emails_sent_total", "Digest emails handed to SMTP or the outbox")
EMAIL_SEND_LATENESS = Histogram(
    "herald_email_send_lateness_seconds",
    "Time from a batch's deadline to its emails being sent",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
EMAIL_CLAIM_GROUP_SIZE = Histogram(
    "herald_email_claim_group_size",
    "Users whose flushes were claimed together in one transaction",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
PUSHES = Counter(
    "herald_pushes_total", "Push sends by provider and outcome", ["provider", "outcome"]
)
PUSH_LATENCY = Histogram(
    "herald_push_latency_seconds",
    "Time a provider took to answer one push",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PUSH_STAGE = Histogram(
    "herald_push_stage_seconds",
    "Time a message push spent in each stage of a worker: handoff (from its worker thread "
    "to its push engine), plan (the database decides whom to send to), send (until every "
    "provider answered), record (the answers written)",
    ["stage"],
    buckets=STEP_BUCKETS,
)
