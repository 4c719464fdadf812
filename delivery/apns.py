"""Apple Push Notification service (APNs) sender, built on aioapns.

``ApnsSender`` sends one notification to one device token and turns APNs' answer
into a :class:`~delivery.outcomes.SendResult`. It is created and used inside a single
asyncio event loop (a PushActor's delivery thread); the aioapns client is made on the
first send, inside that loop, and keeps a pool of HTTP/2 connections that every send
reuses (one connection carries many concurrent streams).

Parameters of ``ApnsSender`` (all keyword-only):
  topic: the bundle id the client is set up with (``APNS_TOPIC``); each send names
    its own ``apns-topic`` (the device's ``ios_app_id``).
  key_file, key_id, team_id: token authentication with a ``.p8`` signing key.
  cert_file: certificate authentication instead of a key: one PEM file holding the
    client certificate and its private key (aioapns loads it with
    ``SSLContext.load_cert_chain(cert_file)``, which takes no separate key file).
  sandbox: use Apple's development endpoint.
  endpoint: ``"host:port"`` overriding Apple's endpoint (staging, tests).
  ca_file: an extra CA bundle to trust (in addition to the system store) when
    verifying the endpoint's certificate.
  timeout: seconds to wait for one answer; aioapns has no response timeout.
  max_connections: size of the connection pool.

What aioapns does not do, and how this module fills the gaps (all in one subclass of
aioapns' protocol class, installed on ``client.pool.protocol_class``; aioapns itself is
used unmodified):

* Endpoint: aioapns takes no host argument; the subclass sets ``APNS_SERVER`` and
  ``APNS_PORT``.
* ``Retry-After``: aioapns reads the response headers but keeps only ``:status`` and
  ``apns-id``; ``NotificationResult`` has no headers. The subclass copies
  ``Retry-After`` from error responses into a per-sender dict keyed by ``apns-id``.
* Provider tokens (JWT): aioapns makes a new ``JWTAuthorizationHeaderProvider`` for
  every connection, and each one signs a fresh token on first use and then every 30
  minutes (``TOKEN_TTL``). Connections are closed after an idle period and reopened on
  demand, so with aioapns' defaults a bursty sender would sign a new token on every
  reconnect, breaking Apple's rule (refresh no more often than every 20 minutes; no
  token older than 60 minutes) and earning ``TooManyProviderTokenUpdates``. The
  subclass replaces the per-connection provider with one shared by all connections of
  a sender, refreshed every ``JWT_REFRESH_SECONDS`` (40 minutes).
* Flow control: when a request body does not fit the connection's window, h2 raises
  and aioapns strands the half-sent stream, sleeps a second and resends; the subclass
  gives its h2 connection a queue for such bodies instead.
* Header cost: h2 re-validates and re-normalises every outgoing header list and
  Huffman-codes every literal in pure Python, which together cost more CPU per push
  than everything else in the send. aioapns builds the same well-formed headers every
  time (device tokens are checked at registration), so the connection skips that
  checking and sends literals uncompressed; the few bytes more per request are
  cheaper than the CPU.
* Answers without a ``reason`` body (a bare 5xx from a proxy, say) leave aioapns
  waiting forever; the subclass completes them when their stream ends. It also
  returns flow-control credit for response bodies (aioapns never does, so enough
  error bodies would stall a connection), resets the stream of a send that timed out
  (freeing its channel) and ignores answers that arrive after the caller gave up.
* Stream limit: aioapns cannot raise a connection's limit on concurrent streams while
  they are all in use, which is how APNs raises it on a new token-authenticated
  connection (from one); the subclass keeps the count itself (`_StreamSlots`).
* Close: aioapns sends again, on a new connection, a request whose connection closed
  under it; `ApnsSender.close` ends its sends in flight first, as transient failures.
* Payload size: a body over Apple's 4 KiB is refused before anything is sent.

Never logged: device tokens, keys, provider tokens, payload content.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jwt
from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsTLSClientProtocol, AuthorizationHeaderProvider, ChannelPool
from aioapns.exceptions import ConnectionClosed, MaxAttemptsExceeded
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.settings import ChangedSetting, SettingCodes
from hpack import Encoder

from delivery.outcomes import Outcome, SendResult, parse_retry_after

logger = logging.getLogger(__name__)

# Apple's production endpoint host.
PRODUCTION_HOST = "api.push.apple.com"
# Apple's development (sandbox) endpoint host.
SANDBOX_HOST = "api.sandbox.push.apple.com"
# Port of Apple's endpoints (443; 2197 is the alternative for blocked networks).
DEFAULT_PORT = 443

# Age at which the shared provider token is re-signed: inside Apple's window of
# "no more often than every 20 minutes, no older than 60 minutes".
JWT_REFRESH_SECONDS = 40 * 60
# Apple's floor between two token refreshes; a server-side "expired" verdict on a
# younger token does not trigger an early refresh.
JWT_MIN_REFRESH_SECONDS = 20 * 60
# Seconds an idle connection stays open (aioapns' default is 10 s; Apple asks providers
# to keep connections open rather than reconnect for every burst).
CONNECTION_IDLE_SECONDS = 60
# Connection attempts aioapns makes per send before giving up (1 s apart); herald's own
# retries take over after that.
MAX_CONNECTION_ATTEMPTS = 2

# Reasons meaning the device token is dead: delete the device, do not retry.
INVALID_DEVICE_REASONS = frozenset(
    {"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic", "ExpiredToken"}
)
# Reasons worth retrying later, whatever their HTTP status.
TRANSIENT_REASONS = frozenset(
    {
        "ExpiredProviderToken",
        "TooManyRequests",
        "TooManyProviderTokenUpdates",
        "InternalServerError",
        "ServiceUnavailable",
        "Shutdown",
        "IdleTimeout",
    }
)
# HTTP status APNs uses for a device token that is no longer active.
HTTP_GONE = 410
# HTTP status for throttling.
HTTP_TOO_MANY_REQUESTS = 429

# Reason reported when no answer came within the timeout.
REASON_TIMEOUT = "timeout"
# Reason reported for sends the sender's close cut short.
REASON_CLOSED = "sender closed"
# Apple's limit on a notification's JSON payload, in bytes (VoIP pushes, never sent
# here, may have 5120).
MAX_PAYLOAD_BYTES = 4096
# Apple's reason for a payload over that limit; herald refuses it without sending.
REASON_PAYLOAD_TOO_LARGE = "PayloadTooLarge"


class ProviderToken(AuthorizationHeaderProvider):
    """One APNs provider token (ES256 JWT), shared by every connection of a sender.

    Parameters:
      key: the EC P-256 private key from the ``.p8`` file.
      key_id: the key's id (the JWT ``kid`` header).
      team_id: the developer team id (the JWT ``iss`` claim).
      clock: source of the current UNIX time (tests pass a fake one).
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._issued_at = 0
        self._header: str | None = None

    @property
    def issued_at(self) -> int:
        """UNIX time of the current token's ``iat`` (0 before the first one)."""
        return self._issued_at

    def get_header(self) -> str:
        """The ``authorization`` header value, re-signed once the token is old enough."""
        now = self._clock()
        if self._header is None or now - self._issued_at >= JWT_REFRESH_SECONDS:
            self._issued_at = int(now)
            token = jwt.encode(
                {"iss": self._team_id, "iat": self._issued_at},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._header = f"bearer {token}"
        return self._header

    def server_says_expired(self) -> None:
        """APNs answered ``ExpiredProviderToken``: re-sign on next use if Apple allows it."""
        if self._header is not None and self._clock() - self._issued_at >= JWT_MIN_REFRESH_SECONDS:
            self._header = None


class _UncompressedEncoder(Encoder):
    """HPACK without Huffman coding: indexed headers as usual, literals as they are."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)  # type: ignore[no-any-return]


# aioapns' headers are well-formed by construction: skip h2's per-request checks.
_CLIENT_CONFIG = H2Configuration(
    client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
    split_outbound_cookies=False,
)


class _FlowControlledH2Connection(H2Connection):
    """An h2 client connection that queues DATA the peer's window cannot take yet.

    aioapns sends a request's HEADERS, then its DATA; when the connection's
    flow-control window is too small for the DATA, h2 raises ``FlowControlError`` and
    aioapns abandons the half-sent stream (holding one of its channels for good),
    sleeps a second and sends again. A burst of a few hundred pushes on a fresh
    connection (64 KiB window) hits that. Queued DATA goes out as WINDOW_UPDATEs arrive.
    """

    def __init__(self) -> None:
        super().__init__(_CLIENT_CONFIG)
        self.encoder = _UncompressedEncoder()
        # (stream id, body, end_stream) waiting for window, oldest first.
        self.backlog: collections.deque[tuple[int, bytes, bool]] = collections.deque()

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        if self.backlog or len(data) > self.local_flow_control_window(stream_id):
            self.backlog.append((stream_id, bytes(data), end_stream))
            return
        super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)

    def send_backlog(self) -> None:
        """Send as much queued DATA as the windows allow, in order."""
        while self.backlog:
            stream_id, data, end_stream = self.backlog[0]
            try:
                if len(data) > self.local_flow_control_window(stream_id):
                    return
                super().send_data(stream_id, data, end_stream=end_stream)
            except H2Error:
                pass  # the stream is gone (reset by the server): drop its body
            self.backlog.popleft()


class _StreamSlots(ChannelPool):
    """aioapns' count of a connection's free streams, whose limit follows the server's
    SETTINGS_MAX_CONCURRENT_STREAMS up as well as down.

    aioapns raises the limit by releasing the new slots one at a time, each release
    capped at the old limit; a limit raised while every stream is in use therefore
    stays near the old one for the connection's life. APNs does exactly that with
    token authentication: one stream until a request with a valid token is answered,
    then up to 1000.
    """

    def set_limit(self, limit: int) -> None:
        """Make `limit` streams the most in flight; runs on the connection's loop."""
        raised = limit - self._bound_value
        self._bound_value = limit
        if raised > 0:
            for _ in range(raised):
                self.release()  # capped at the new limit now; wakes a waiting send
        else:
            # Streams in flight above the new limit end before another may start.
            self._value += raised


class _HeraldProtocol(APNsTLSClientProtocol):
    """aioapns' TLS protocol with herald's fixes; bound to one sender by `_bind_protocol`."""

    INACTIVITY_TIME = CONNECTION_IDLE_SECONDS
    # The sender's shared provider token (None with certificate auth).
    shared_auth: ClassVar[AuthorizationHeaderProvider | None] = None
    # Where Retry-After values of error answers go, keyed by apns-id.
    retry_after_sink: ClassVar[dict[str, str]]

    def __init__(
        self,
        apns_topic: str,
        loop: asyncio.AbstractEventLoop | None = None,
        on_connection_lost: Any = None,
        auth_provider: AuthorizationHeaderProvider | None = None,
    ) -> None:
        # aioapns hands every connection its own JWT provider; use the shared one.
        if auth_provider is not None and self.shared_auth is not None:
            auth_provider = self.shared_auth
        super().__init__(apns_topic, loop, on_connection_lost, auth_provider)
        self.free_channels = _StreamSlots(self.free_channels.bound)
        self._h2 = _FlowControlledH2Connection()
        self.conn = self._h2
        self._last_active = 0.0
        self._write_scheduled = False

    def flush(self) -> None:
        # aioapns writes after each request and each read. Under load the loop makes
        # many requests in one turn; writing once at the end of the turn sends them in
        # one TLS record and one system call, and wakes the server once.
        self.refresh_inactivity_timer()
        if not self._write_scheduled:
            self._write_scheduled = True
            self.loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)

    def refresh_inactivity_timer(self) -> None:
        # aioapns cancels and schedules its idle timer on every write, so a timer per push.
        # Noting the time is enough: the one timer looks when it fires, and waits out the
        # rest if the connection was used meanwhile.
        self._last_active = self.loop.time()
        if self.inactivity_timer is None or self.inactivity_timer.cancelled():
            self.inactivity_timer = self.loop.call_later(self.INACTIVITY_TIME,
                                                         self._close_if_idle)

    def _close_if_idle(self) -> None:
        idle = self.loop.time() - self._last_active
        if idle >= self.INACTIVITY_TIME:
            self.close()
            return
        self.inactivity_timer = self.loop.call_later(self.INACTIVITY_TIME - idle,
                                                     self._close_if_idle)

    def on_remote_settings_changed(self, changed_settings: dict[Any, ChangedSetting]) -> None:
        for setting in changed_settings.values():
            if setting.setting == SettingCodes.MAX_CONCURRENT_STREAMS:
                slots = self.free_channels
                assert isinstance(slots, _StreamSlots)
                slots.set_limit(setting.new_value)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._h2.backlog:
            # WINDOW_UPDATE frames may have opened the window for queued bodies.
            self._h2.send_backlog()
            self.flush()

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        try:
            return await super().send_notification(request)
        except asyncio.CancelledError:
            # The caller timed out: reset the stream so its channel is not held until
            # (or, from a hung server, beyond) the late answer.
            self._abandon(request.notification_id)
            raise

    def _abandon(self, notification_id: str) -> None:
        stream_id = next(
            (sid for sid, nid in self.request_streams.items() if nid == notification_id), None
        )
        if stream_id is None:
            return  # never sent (still waiting for a channel) or already answered
        del self.request_streams[stream_id]
        self._forget(notification_id)
        try:
            self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        except H2Error:
            # Closed already: the server reset it, which aioapns does not notice (it
            # frees a channel only when a stream ends). The channel is free all the same.
            pass
        self.free_channels.release()
        self._h2.send_backlog()  # its queued body, if any, may have been holding the line
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    def _forget(self, notification_id: str) -> None:
        self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)

    def on_response_received(self, headers: dict[bytes, bytes]) -> None:
        notification_id = headers.get(b"apns-id", b"").decode("latin-1")
        future = self.requests.get(notification_id)
        if future is None or future.done():
            # Unknown, or the caller gave up (timeout): setting a result now would raise.
            self._forget(notification_id)
            return
        if headers.get(b":status") != b"200":
            retry_after = headers.get(b"retry-after")
            if retry_after is not None:
                self.retry_after_sink[notification_id] = retry_after.decode("latin-1")
        super().on_response_received(headers)

    def on_data_received(self, data: bytes, stream_id: int) -> None:
        # Give the flow-control credit back, or the connection window runs dry.
        self.conn.acknowledge_received_data(len(data), stream_id)
        notification_id = self.request_streams.get(stream_id)
        if notification_id is None:
            return
        future = self.requests.get(notification_id)
        if future is None or future.done() or notification_id not in self.request_statuses:
            return
        try:
            super().on_data_received(data, stream_id)
        except ValueError:
            # Not JSON (or not UTF-8): on_stream_ended completes it without a reason.
            pass

    def on_stream_ended(self, stream_id: int) -> None:
        # aioapns forgets a stream only when its answer had a reason; tidy up here and
        # complete answers that ended without one.
        notification_id = self.request_streams.pop(stream_id, None)
        if notification_id is not None:
            future = self.requests.pop(notification_id, None)
            status = self.request_statuses.pop(notification_id, None)
            if future is not None and not future.done():
                future.set_result(NotificationResult(notification_id, status or "", ""))
        super().on_stream_ended(stream_id)


def _bind_protocol(
    host: str,
    port: int,
    auth: AuthorizationHeaderProvider | None,
    retry_after_sink: dict[str, str],
) -> type[APNsTLSClientProtocol]:
    """A protocol class for one sender: its endpoint, token and Retry-After sink."""

    class BoundProtocol(_HeraldProtocol):
        APNS_SERVER = host
        APNS_PORT = port
        shared_auth = auth

    BoundProtocol.retry_after_sink = retry_after_sink
    return BoundProtocol


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``, or a bare host for port 443) → (host, port)."""
    text = endpoint.strip()
    if not text:
        raise ValueError("APNS_ENDPOINT: empty")
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"APNS_ENDPOINT: bad host in {endpoint!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"APNS_ENDPOINT: expected host:port, got {endpoint!r}")
            port = _port(rest[1:], endpoint)
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _port(port_text, endpoint)
    if not host:
        raise ValueError(f"APNS_ENDPOINT: missing host in {endpoint!r}")
    return host, port


def _port(text: str, endpoint: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"APNS_ENDPOINT: bad port in {endpoint!r}")
    return int(text)


async def _ignore_error(request: NotificationRequest, result: NotificationResult) -> None:
    """aioapns logs every failed answer itself unless given this hook; herald maps them."""


class ApnsSender:
    """Sends notifications to APNs over a pool of reused HTTP/2 connections.

    Parameters (keyword-only):
      topic: bundle id the client is set up with (``APNS_TOPIC``).
      key_file, key_id, team_id: ``.p8`` token authentication (all three together).
      cert_file: PEM with client certificate and key, instead of token authentication.
      sandbox: Apple's development endpoint instead of production.
      endpoint: ``"host:port"`` override of Apple's endpoint.
      ca_file: extra CA bundle trusted for the endpoint (added to the system store).
      timeout: seconds to wait for each answer before reporting TRANSIENT ``timeout``.
      max_connections: most HTTP/2 connections kept open at once.

    Raises ValueError (naming the setting) for incomplete or unreadable credentials.
    """

    def __init__(
        self,
        *,
        topic: str,
        key_file: str | None = None,
        key_id: str | None = None,
        team_id: str | None = None,
        cert_file: str | None = None,
        sandbox: bool = False,
        endpoint: str | None = None,
        ca_file: str | None = None,
        timeout: float = 10.0,
        max_connections: int = 10,
    ) -> None:
        if not topic:
            raise ValueError("APNS_TOPIC: required")
        if timeout <= 0:
            raise ValueError("APNs timeout must be positive")
        if max_connections < 1:
            raise ValueError("APNs max_connections must be at least 1")
        if cert_file and key_file:
            raise ValueError("APNS_CERT_FILE: give either a certificate or a key file, not both")
        self.topic = topic
        self.timeout = timeout
        self.max_connections = max_connections
        if endpoint:
            self.host, self.port = parse_endpoint(endpoint)
        else:
            self.host, self.port = (SANDBOX_HOST if sandbox else PRODUCTION_HOST), DEFAULT_PORT

        self._ssl_context = ssl.create_default_context()
        if ca_file:
            try:
                self._ssl_context.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"APNS_CA_FILE: cannot load ({type(exc).__name__})") from None

        self._cert_file = cert_file
        self._key_pem: str | None = None
        self._key_id = key_id
        self._team_id = team_id
        self._auth: ProviderToken | None = None
        if cert_file:
            try:
                # aioapns loads it again into the same context; this just fails early.
                self._ssl_context.load_cert_chain(cert_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"APNS_CERT_FILE: cannot load certificate and key ({type(exc).__name__})"
                ) from None
        elif key_file:
            if not key_id:
                raise ValueError("APNS_KEY_ID: required with APNS_KEY_FILE")
            if not team_id:
                raise ValueError("APNS_TEAM_ID: required with APNS_KEY_FILE")
            self._key_pem, key = _load_p8(key_file)
            self._auth = ProviderToken(key, key_id, team_id)
        else:
            raise ValueError("APNS_KEY_FILE or APNS_CERT_FILE: one is required")

        # Retry-After values of error answers, keyed by apns-id (filled by the protocol).
        self._retry_after: dict[str, str] = {}
        self._client: APNs | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # aioapns sends in progress (their tasks), for close() to end.
        self._sending: set[asyncio.Future[NotificationResult]] = set()

    def _get_client(self) -> APNs:
        if self._client is None:
            # aioapns binds its pool to the running loop, so build it here, not in __init__.
            self._loop = asyncio.get_running_loop()
            if self._cert_file:
                client = APNs(
                    client_cert=self._cert_file,
                    topic=self.topic,
                    max_connections=self.max_connections,
                    max_connection_attempts=MAX_CONNECTION_ATTEMPTS,
                    ssl_context=self._ssl_context,
                    err_func=_ignore_error,
                )
            else:
                client = APNs(
                    key=self._key_pem,
                    key_id=self._key_id,
                    team_id=self._team_id,
                    topic=self.topic,
                    max_connections=self.max_connections,
                    max_connection_attempts=MAX_CONNECTION_ATTEMPTS,
                    ssl_context=self._ssl_context,
                    err_func=_ignore_error,
                )
            client.pool.protocol_class = _bind_protocol(
                self.host, self.port, self._auth, self._retry_after
            )
            self._client = client
        elif asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("ApnsSender used from a different event loop")
        return self._client

    @property
    def connection_count(self) -> int:
        """HTTP/2 connections currently open in the pool."""
        return len(self._client.pool.connections) if self._client is not None else 0

    async def send(
        self,
        token: str,
        *,
        topic: str,
        payload: dict[str, Any],
        push_type: str = "alert",
        expiration: int | None = None,
        priority: int = 10,
        collapse_key: str | None = None,
    ) -> SendResult:
        """Send one notification and say how it went.

        Parameters:
          token: the device token (hex).
          topic: ``apns-topic``, the device's ``ios_app_id``.
          payload: the JSON payload (``{"aps": {...}, ...}``).
          push_type: ``apns-push-type`` (``alert``, ``background``, ...).
          expiration: ``apns-expiration`` as a UNIX time in seconds (``0``: deliver now or
            never); None leaves it to APNs. aioapns takes a time-to-live and adds it to
            its own clock when it writes the header, so the header may differ by a second.
          priority: ``apns-priority`` (10 immediate, 5 power-considerate, 1 low).
          collapse_key: ``apns-collapse-id``.
        """
        if self._closed:
            raise RuntimeError("ApnsSender is closed")
        try:
            kind = PushType(push_type)
        except ValueError:
            return SendResult(Outcome.PERMANENT, "unsupported push type")
        try:
            # aioapns serialises after writing the headers, which would strand the stream;
            # a body over the limit would be refused by APNs, or, over h2's frame size or
            # the connection's window, hold up every send queued behind it.
            body = json.dumps(payload, ensure_ascii=False).encode()
        except (TypeError, ValueError):
            return SendResult(Outcome.PERMANENT, "payload is not JSON-serialisable")
        if len(body) > MAX_PAYLOAD_BYTES:
            return SendResult(Outcome.PERMANENT, REASON_PAYLOAD_TOO_LARGE)
        time_to_live = None
        if expiration is not None:
            time_to_live = max(0, int(expiration) - int(time.time()))
        request = NotificationRequest(
            device_token=token,
            message=payload,
            time_to_live=time_to_live,
            priority=priority,
            collapse_key=collapse_key,
            push_type=kind,
            apns_topic=topic,
        )
        client = self._get_client()
        notification_id = request.notification_id
        sending = asyncio.ensure_future(client.send_notification(request))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        try:
            result = await asyncio.wait_for(sending, self.timeout)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if sending.cancelled() and self._closed and not (current and current.cancelling()):
                return SendResult(Outcome.TRANSIENT, REASON_CLOSED)  # cut short by close()
            raise
        except TimeoutError:
            logger.debug("APNs send %s: no answer in %.1f s", notification_id, self.timeout)
            return SendResult(Outcome.TRANSIENT, REASON_TIMEOUT)
        except (
            MaxAttemptsExceeded,
            ApnsConnectionError,
            ConnectionClosed,
            OSError,
            H2Error,
        ) as exc:
            logger.debug("APNs send %s: %s", notification_id, type(exc).__name__)
            return SendResult(Outcome.TRANSIENT, f"connection error ({type(exc).__name__})")
        finally:
            retry_after_raw = self._retry_after.pop(notification_id, None)
        return self._map(result, parse_retry_after(retry_after_raw))

    def _map(self, result: NotificationResult, retry_after: float | None) -> SendResult:
        try:
            status = int(result.status)
        except ValueError:
            status = 0
        if status == 200:
            return SendResult(Outcome.DELIVERED)
        reason = result.description or f"HTTP {result.status or '?'}"
        if status == HTTP_GONE or reason in INVALID_DEVICE_REASONS:
            outcome = Outcome.INVALID_DEVICE
        elif status >= 500 or status == HTTP_TOO_MANY_REQUESTS or reason in TRANSIENT_REASONS:
            outcome = Outcome.TRANSIENT
            if reason == "ExpiredProviderToken" and self._auth is not None:
                self._auth.server_says_expired()
        elif status == 0:
            outcome = Outcome.TRANSIENT
        else:
            outcome = Outcome.PERMANENT
        logger.debug("APNs send %s: HTTP %s %s", result.notification_id, result.status, reason)
        return SendResult(outcome, reason, retry_after if outcome is Outcome.TRANSIENT else None)

    async def close(self) -> None:
        """Close every pooled connection; the sender cannot be used afterwards."""
        self._closed = True
        client, self._client = self._client, None
        if client is None:
            return
        # A send whose connection closes under it would be tried again by aioapns on a
        # new connection, opened after this close: a second delivery, and a connection
        # nobody closes. Such sends end here, as transient failures.
        for sending in list(self._sending):
            sending.cancel()
        pool = client.pool
        pool.close()
        # Let the transports finish closing (connection_lost removes them from the pool).
        for _ in range(50):
            if not pool.connections:
                break
            await asyncio.sleep(0.01)


def _load_p8(path: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """Read and check a ``.p8`` signing key: (PEM text for aioapns, the key object)."""
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise ValueError(f"APNS_KEY_FILE: cannot read ({type(exc).__name__})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("APNS_KEY_FILE: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("APNS_KEY_FILE: not an EC P-256 key")
    return pem.decode("ascii"), key


__all__ = [
    "ApnsSender",
    "ProviderToken",
    "parse_endpoint",
    "parse_retry_after",
]
