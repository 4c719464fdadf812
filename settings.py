"""herald's configuration: every environment variable, parsed and validated in one place.

`load_settings()` reads the environment once at start. A bad value raises
`ConfigError` whose message is one line naming the variable; `supervisor.py` prints
that line and exits with status 2.
"""

from __future__ import annotations

import os
from email.utils import formataddr, parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Upper bound for a user's batching window: one week, as the contract says.
MAX_BATCHING_PERIOD_SECONDS = 604_800


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the variable."""


class SmtpTarget:
    """A parsed `SMTP_URL`.

    Parameters:
      url: `smtp://[user:pass@]host:port`, `smtps://…` for implicit TLS, and
        `?starttls=1` to upgrade a plain connection.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("scheme must be smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("a host is required")
        self.use_tls = parts.scheme == "smtps"
        query = parse_qs(parts.query)
        self.starttls = query.get("starttls", ["0"])[0] in ("1", "true", "yes")
        self.host = parts.hostname
        self.port = parts.port or (465 if self.use_tls else 25)
        self.username = parts.username
        self.password = parts.password

    def __repr__(self) -> str:  # never shows the password
        return f"SmtpTarget({self.host}:{self.port}, tls={self.use_tls}, starttls={self.starttls})"


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU numbers from Linux's list syntax ("1", "0,2-3"), each one this process may use."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("not supported on this platform")
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError("must be a CPU list such as 1 or 0,2-3")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part.strip()!r} is an empty range")
        cpus.update(range(low, high + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        missing = ",".join(str(cpu) for cpu in sorted(cpus - allowed))
        usable = ",".join(str(cpu) for cpu in sorted(allowed))
        raise ValueError(f"not CPUs this process may use: {missing} (it may use {usable})")
    return frozenset(cpus)


class Settings(BaseSettings):
    """Every setting herald reads, with the contract's names and defaults."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    DATABASE_URL: str = "sqlite:///herald.db"
    BROKER_URL: str | None = None
    PORT: int = Field(8000, ge=1, le=65535)
    HOST: str = "127.0.0.1"
    HERALD_API_KEYS: str | None = None
    PUSH_SHARDS: int = Field(1, ge=1, le=1024)

    SMTP_URL: str | None = None
    EMAIL_FROM: str = "herald <noreply@localhost>"
    OUTBOX_DIR: str = "outbox"
    # Messages shown in one email before "and N more".
    EMAIL_MAX_MESSAGES: int = Field(50, ge=1, le=10_000)
    # Base URL of this herald's public HTTP API, used in unsubscribe links.
    PUBLIC_URL: str | None = None
    # Signs unsubscribe links; defaults to a key derived from the API keys.
    HERALD_SECRET_KEY: str | None = None
    SMTP_TIMEOUT_SECONDS: float = Field(30.0, gt=0)

    APNS_KEY_FILE: str | None = None
    APNS_KEY_ID: str | None = None
    APNS_TEAM_ID: str | None = None
    APNS_TOPIC: str | None = None
    APNS_CERT_FILE: str | None = None
    APNS_SANDBOX: bool = False
    APNS_ENDPOINT: str | None = None
    APNS_CA_FILE: str | None = None

    FCM_CREDENTIALS: str | None = None
    FCM_PROJECT_ID: str | None = None
    FCM_ENDPOINT: str | None = None

    PUSH_BOUNCER_URL: str | None = None
    PUSH_BOUNCER_SERVER_UUID: str | None = None
    PUSH_BOUNCER_API_KEY: str | None = None
    # Replace message content in pushes with "New message".
    PUSH_REDACT_CONTENT: bool = False
    # Requests to one provider in flight at once, per PushActor.
    PUSH_INFLIGHT_CAP: int = Field(200, ge=1, le=10_000)
    # Seconds to wait for a provider's answer before treating the send as transient.
    PUSH_TIMEOUT_SECONDS: float = Field(10.0, gt=0)

    RETRY_MIN_BACKOFF_MS: int = Field(1000, ge=1)
    RETRY_MAX_BACKOFF_MS: int = Field(300_000, ge=1)
    RETRY_MAX_TRIES: int = Field(10, ge=1, le=1000)

    # Seconds a stopping worker gives the messages in hand before it stops the actors,
    # which fail what is left for a retry (kept for the next start on the embedded
    # default). Keep it below the process manager's grace period.
    DRAIN_SECONDS: float = Field(60.0, gt=0, le=3600)

    # Dramatiq consumer threads per worker process. Each waits while its event is being
    # recorded or pushed, so this bounds the events in flight per process.
    WORKER_THREADS: int = Field(64, ge=1, le=1024)
    # Threads shared by all pooled actors (one UserBatchActor per pending user).
    ACTOR_POOL_THREADS: int = Field(8, ge=1, le=256)
    # Erlang-style restart intensity: at most this many restarts ...
    SUPERVISOR_MAX_RESTARTS: int = Field(10, ge=0)
    # ... within this many seconds, else the process exits non-zero.
    SUPERVISOR_PERIOD_SECONDS: float = Field(60.0, gt=0)

    # Largest request body the ingest API accepts.
    MAX_BODY_BYTES: int = Field(1_048_576, ge=1024)
    # Events one POST /v1/events may carry.
    MAX_EVENTS_PER_REQUEST: int = Field(1000, ge=1)
    IDEMPOTENCY_TTL_SECONDS: int = Field(86_400, ge=1)
    METRICS_PORT: int | None = Field(None, ge=1, le=65535)

    # CPUs this process may run on, in Linux's list syntax ("1", "0,2-3"); unset: any.
    CPU_AFFINITY: str | None = None

    LOG_FORMAT: Literal["text", "json"] = "text"
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///path or postgresql://…")
        if value.startswith("sqlite:///"):
            if not value[len("sqlite:///"):].split("?")[0]:
                raise ValueError("sqlite:/// needs a file path (sqlite:///herald.db)")
            # The path as models.make_database opens it. SQLite creates the file but
            # not its directory, and would fail only at the first connection, as if the
            # database were down for a while rather than misconfigured.
            path = unquote(value[len("sqlite:///"):])
            if path != ":memory:":
                directory = Path(path).parent
                if not directory.is_dir():
                    state = "is not a directory" if directory.exists() else "does not exist"
                    raise ValueError(f"directory {directory} {state} (for {path})")
        else:
            from models import postgres_parameters

            postgres_parameters(value)
        return value

    @field_validator("BROKER_URL")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must be amqp://… (RabbitMQ)")
        return value or None

    @field_validator("HERALD_API_KEYS")
    @classmethod
    def _api_keys(cls, value: str | None) -> str | None:
        # A header value reaches the API as Latin-1, so a key with any other character
        # could never match; control characters cannot be sent in a header at all.
        # The message never shows a key.
        for position, key in enumerate((value or "").split(","), start=1):
            key = key.strip()  # as `api_keys` reads them: a trailing newline is fine
            if not (key.isascii() and key.isprintable()):
                raise ValueError(f"key {position} has a character other than printable "
                                 "ASCII, which no Authorization header can carry")
        return value

    @field_validator("EMAIL_FROM")
    @classmethod
    def _email_from(cls, value: str) -> str:
        # As rendering/email.py writes the From header: the display name may be
        # non-ASCII (encoded per RFC 2047), but an address cannot be encoded, and every
        # email would fail to render.
        name, address = parseaddr(value)
        try:
            formataddr((name, address))
        except UnicodeEncodeError:
            raise ValueError("the address must be ASCII (a display name need not be, as "
                             "in Hérald <noreply@example.com>)") from None
        return value

    @field_validator("SMTP_URL")
    @classmethod
    def _smtp_url(cls, value: str | None) -> str | None:
        if value:
            SmtpTarget(value)
        return value or None

    @field_validator("APNS_ENDPOINT")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("must be host:port")
        return value or None

    @field_validator("CPU_AFFINITY")
    @classmethod
    def _cpu_affinity(cls, value: str | None) -> str | None:
        if value:
            parse_cpu_list(value)
        return value or None

    @field_validator("APNS_KEY_FILE", "APNS_CERT_FILE", "APNS_CA_FILE", "FCM_CREDENTIALS")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value or None

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.RETRY_MAX_BACKOFF_MS < self.RETRY_MIN_BACKOFF_MS:
            raise ValueError("RETRY_MAX_BACKOFF_MS: must be at least RETRY_MIN_BACKOFF_MS")
        if self.APNS_KEY_FILE and not (self.APNS_KEY_ID and self.APNS_TEAM_ID and self.APNS_TOPIC):
            raise ValueError("APNS_KEY_FILE: needs APNS_KEY_ID, APNS_TEAM_ID and APNS_TOPIC too")
        if self.APNS_CERT_FILE and not self.APNS_TOPIC:
            raise ValueError("APNS_CERT_FILE: needs APNS_TOPIC too")
        if self.PUSH_BOUNCER_URL and not (
            self.PUSH_BOUNCER_SERVER_UUID and self.PUSH_BOUNCER_API_KEY
        ):
            raise ValueError(
                "PUSH_BOUNCER_URL: needs PUSH_BOUNCER_SERVER_UUID and PUSH_BOUNCER_API_KEY"
            )
        return self

    # Derived views -------------------------------------------------------------

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.HERALD_API_KEYS or "").split(",") if k.strip()]

    @property
    def cpu_affinity(self) -> frozenset[int] | None:
        return parse_cpu_list(self.CPU_AFFINITY) if self.CPU_AFFINITY else None

    @property
    def smtp(self) -> SmtpTarget | None:
        return SmtpTarget(self.SMTP_URL) if self.SMTP_URL else None

    @property
    def apns_enabled(self) -> bool:
        return bool(self.APNS_KEY_FILE or self.APNS_CERT_FILE)

    @property
    def fcm_enabled(self) -> bool:
        return bool(self.FCM_CREDENTIALS)

    @property
    def public_url(self) -> str:
        return (self.PUBLIC_URL or f"http://{self.HOST}:{self.PORT}").rstrip("/")

    @property
    def secret_key(self) -> str:
        if self.HERALD_SECRET_KEY:
            return self.HERALD_SECRET_KEY
        # Stable for a given key set, so links survive restarts of the same deployment.
        return "herald-unsubscribe:" + ",".join(sorted(self.api_keys))


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from `environ` (default: the process environment).

    Raises `ConfigError` with one line such as
    ``PUSH_SHARDS: Input should be a valid integer (got 'x')``.
    """
    env = dict(os.environ if environ is None else environ)
    known = set(Settings.model_fields)
    values: dict[str, Any] = {k: v for k, v in env.items() if k in known and v != ""}
    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error.get("loc", ())) or None
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if where is None and ":" in message:
            raise ConfigError(message) from None
        got = error.get("input")
        secret = where is not None and where.endswith(("KEY", "KEYS", "URL"))
        shown = f" (got {got!r})" if where and isinstance(got, str) and not secret else ""
        raise ConfigError(f"{where or 'configuration'}: {message}{shown}") from None
