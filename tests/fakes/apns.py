"""A fake APNs server speaking the real protocol: HTTP/2 over TLS, on 127.0.0.1.

``FakeApns`` runs an asyncio event loop in a background thread and serves
``POST /3/device/<token>`` the way Apple does, closely enough for aioapns:

* TLS with a certificate for ``IP:127.0.0.1`` issued by a CA made on the spot
  (``ca_file``); ALPN ``h2`` is offered but not required (aioapns offers none).
* Token authentication: ``authorization: bearer <JWT>`` is verified (ES256, ``kid``
  header, ``iss`` claim, age under an hour) against the key given to the constructor;
  a wrong one is answered 403 ``InvalidProviderToken`` (``ExpiredProviderToken`` when
  too old, ``MissingProviderToken`` when absent). Verification is cached per token.
* Certificate authentication: a connection that presented a client certificate signed
  by the fake's CA (see ``make_client_cert``) needs no ``authorization`` header.
* Every request is recorded in ``requests`` (thread-safe), its ``apns-id`` echoed (or
  made up), and answered 200, or by the answers scripted for its token
  (``script(token, [(status, reason, headers), ...])``, consumed in order). Error
  answers carry ``{"reason": ...}`` as Apple's do. A scripted status of
  ``RESET_STREAM`` answers with an RST_STREAM (REFUSED_STREAM) instead.
* ``delay`` seconds (settable at any time) are waited before answering, without
  blocking other streams, so hundreds of concurrent streams are served concurrently.

Constructor parameters (keyword-only):
  public_key, key_id, team_id: what provider tokens must be signed with and carry.
  delay: seconds to wait before each answer.
  max_concurrent_streams: the SETTINGS value advertised to clients (Apple's is 1000).

``make_apns_key(directory)`` makes a P-256 signing key as Apple hands it out
(``AuthKey_<kid>.p8``) and returns ``(p8_path, key_id, team_id, public_key)``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import secrets
import shutil
import ssl
import string
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

# Path prefix of the send endpoint.
DEVICE_PATH = "/3/device/"
# Apple's payload limit for ordinary pushes, in bytes.
MAX_PAYLOAD_BYTES = 4096
# A scripted status that resets the stream instead of answering it.
RESET_STREAM = -1
# Apple rejects provider tokens older than this many seconds.
MAX_TOKEN_AGE = 3600
# Leeway for an ``iat`` slightly in the future (clock skew), in seconds.
TOKEN_CLOCK_LEEWAY = 60
# Streams per connection the fake actually accepts: above what it advertises, because a
# client may open streams before it has read the server's SETTINGS frame.
ENFORCED_STREAM_LIMIT = 100_000
# Validity of the generated certificates.
CERT_LIFETIME = timedelta(days=2)

# h2 checks and rewrites every header by default; the fake trusts its clients and
# skips that work to keep up with benchmarks.
_H2_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)

Answer = tuple[int, str | None, dict[str, str]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received.

    Fields:
      token: the device token from the path.
      headers: every request header (pseudo-headers included), names lower-case.
      body: the JSON payload parsed (None if it was not JSON).
      status, reason: what the fake answered.
      connection: serial number of the TLS connection it came on.
    """

    token: str
    headers: dict[str, str]
    body: Any
    status: int
    reason: str | None
    connection: int

    @property
    def topic(self) -> str | None:
        return self.headers.get("apns-topic")

    @property
    def push_type(self) -> str | None:
        return self.headers.get("apns-push-type")

    @property
    def expiration(self) -> int | None:
        value = self.headers.get("apns-expiration")
        return int(value) if value is not None else None

    @property
    def priority(self) -> int | None:
        value = self.headers.get("apns-priority")
        return int(value) if value is not None else None

    @property
    def apns_id(self) -> str | None:
        return self.headers.get("apns-id")

    @property
    def collapse_id(self) -> str | None:
        return self.headers.get("apns-collapse-id")


def make_apns_key(directory: str | Path) -> tuple[str, str, str, ec.EllipticCurvePublicKey]:
    """A new APNs signing key in ``directory``: (p8 path, key id, team id, public key)."""
    alphabet = string.ascii_uppercase + string.digits
    key_id = "".join(secrets.choice(alphabet) for _ in range(10))
    team_id = "".join(secrets.choice(alphabet) for _ in range(10))
    key = ec.generate_private_key(ec.SECP256R1())
    path = Path(directory) / f"AuthKey_{key_id}.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path), key_id, team_id, key.public_key()


class _Authority:
    """A throw-away CA issuing the server certificate and client certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald fake APNs CA")])
        now = datetime.now(UTC)
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = str(directory / "ca.pem")
        Path(self.ca_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, subject: x509.Name, *, server: bool, filename: str) -> str:
        """A leaf certificate + key in one PEM file; returns its path."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        path = self.directory / filename
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(path)


class FakeApns:
    """An HTTP/2-over-TLS APNs look-alike on 127.0.0.1, served from a background thread.

    Parameters (keyword-only):
      public_key: EC public key provider tokens must verify with (None: token auth fails).
      key_id: required ``kid`` of provider tokens.
      team_id: required ``iss`` of provider tokens.
      delay: seconds to wait before answering each request.
      max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
      streams_once_accepted: if set, a connection advertises this many streams (a
        SETTINGS frame sent just before the answer) once a request on it has been
        accepted, as APNs does with token authentication: one stream until a request
        with a valid token, then more.

    Attributes: ``ca_file`` (trust this), ``requests`` (RecordedRequest list),
    ``connections_total``, ``connections_open``, ``provider_tokens`` (distinct JWTs seen),
    ``streams_reset`` (RST_STREAMs received from clients).
    """

    def __init__(
        self,
        *,
        public_key: ec.EllipticCurvePublicKey | None = None,
        key_id: str | None = None,
        team_id: str | None = None,
        delay: float = 0.0,
        max_concurrent_streams: int = 1000,
        streams_once_accepted: int | None = None,
    ) -> None:
        self.public_key = public_key
        self.key_id = key_id
        self.team_id = team_id
        self.delay = delay
        self.max_concurrent_streams = max_concurrent_streams
        self.streams_once_accepted = streams_once_accepted
        self._dir = Path(tempfile.mkdtemp(prefix="fake-apns-"))
        self._authority = _Authority(self._dir)
        self.ca_file = self._authority.ca_file
        self._server_pem = self._authority.issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            server=True,
            filename="server.pem",
        )
        self.requests: list[RecordedRequest] = []
        self.connections_total = 0
        self.connections_open = 0
        self.provider_tokens: set[str] = set()
        self.streams_reset = 0
        self.port = 0
        self._lock = threading.Lock()
        self._scripts: dict[str, collections.deque[Answer]] = {}
        # JWT string -> (failure reason or None, iat); touched only on the server thread.
        self._jwt_cache: dict[str, tuple[str | None, int]] = {}
        self._connections: set[_Connection] = set()
        self._serial = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- control, from the test's thread ------------------------------------------------

    def start(self) -> str:
        """Start serving; returns the endpoint ``"127.0.0.1:PORT"``."""
        if self._thread is not None:
            raise RuntimeError("FakeApns already started")
        self._thread = threading.Thread(target=self._run, name="fake-apns", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("FakeApns did not start")
        if self._error is not None:
            raise RuntimeError(f"FakeApns failed to start: {self._error!r}")
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving, drop every connection and delete the generated files."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeApns:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def script(self, token: str, answers: Iterable[Answer | tuple[int, str | None]]) -> None:
        """Queue answers for ``token``: ``(status, reason or None, headers)``, in order.

        ``headers`` (e.g. ``{"Retry-After": "2"}``) may be left out. Once the queue is
        used up the token is answered normally again.
        """
        queue: collections.deque[Answer] = collections.deque()
        for answer in answers:
            status, reason = answer[0], answer[1]
            headers = answer[2] if len(answer) > 2 else {}  # type: ignore[misc]
            queue.append((int(status), reason, dict(headers)))
        with self._lock:
            self._scripts.setdefault(token, collections.deque()).extend(queue)

    def make_client_cert(self, topic: str) -> str:
        """A client certificate + key (one PEM file) for certificate auth, for ``topic``."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, topic),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
            ]
        )
        return self._authority.issue(
            subject, server=False, filename=f"client-{secrets.token_hex(4)}.pem"
        )

    def close_connections(self) -> None:
        """Drop every open connection (the server keeps listening)."""
        loop = self._loop
        if loop is None:
            return

        def close_all() -> None:
            for connection in list(self._connections):
                connection.close()

        loop.call_soon_threadsafe(close_all)

    def requests_for(self, token: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.token == token]

    # -- the server thread ------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._server_pem)
        context.load_verify_locations(cafile=self.ca_file)
        # Client certificates are optional: token-auth clients present none.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["h2"])
        return context

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    lambda: _Connection(self),
                    "127.0.0.1",
                    0,
                    ssl=self._ssl_context(),
                    backlog=1024,
                )
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.abort()
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def _opened(self, connection: _Connection) -> int:
        self._connections.add(connection)
        self.connections_total += 1
        self.connections_open += 1
        return next(self._serial)

    def _closed(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self.connections_open -= 1

    def _check_token(self, authorization: str) -> str | None:
        """None if the provider token is good, else Apple's reason."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "InvalidProviderToken"
        cached = self._jwt_cache.get(token)
        if cached is None:
            cached = self._verify_jwt(token)
            self._jwt_cache[token] = cached
            self.provider_tokens.add(token)
        reason, issued_at = cached
        if reason is None and time.time() - issued_at > MAX_TOKEN_AGE:
            return "ExpiredProviderToken"
        return reason

    def _verify_jwt(self, token: str) -> tuple[str | None, int]:
        if self.public_key is None:
            return "InvalidProviderToken", 0
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"]},
                leeway=TOKEN_CLOCK_LEEWAY,
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken", 0
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken", 0
        return None, int(claims["iat"])

    def _decide(self, connection: _Connection, headers: dict[str, str], body: bytes) -> Answer:
        """The answer to one complete request."""
        if headers.get(":method") != "POST":
            return 405, "MethodNotAllowed", {}
        path = headers.get(":path", "")
        if not path.startswith(DEVICE_PATH) or len(path) == len(DEVICE_PATH):
            return 404, "BadPath", {}
        authorization = headers.get("authorization")
        if authorization is not None:
            reason = self._check_token(authorization)
            if reason is not None:
                return 403, reason, {}
        elif not connection.client_cert:
            return 403, "MissingProviderToken", {}
        if not headers.get("apns-topic"):
            return 400, "MissingTopic", {}
        token = path[len(DEVICE_PATH) :]
        with self._lock:
            queue = self._scripts.get(token)
            if queue:
                return queue.popleft()
        if not body:
            return 400, "PayloadEmpty", {}
        if len(body) > MAX_PAYLOAD_BYTES:
            return 413, "PayloadTooLarge", {}
        return 200, None, {}

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Connection(asyncio.Protocol):
    """One client connection: an h2 server state machine over a TLS transport."""

    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.conn = H2Connection(config=_H2_CONFIG)
        self.transport: asyncio.Transport | None = None
        self.client_cert = False
        self.serial = 0
        self.loop = asyncio.get_running_loop()
        # stream id -> (request headers, body so far)
        self.streams: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        # stream id -> response body waiting for flow-control credit
        self.blocked: dict[int, bytes] = {}
        self.flush_scheduled = False
        self.is_closed = False
        # Whether `streams_once_accepted` has been advertised on this connection.
        self.streams_raised = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.client_cert = bool(transport.get_extra_info("peercert"))
        self.serial = self.fake._opened(self)
        self.conn.local_settings = Settings(
            client=False,
            initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.max_concurrent_streams},
        )
        self.conn.initiate_connection()
        # Advertise the limit above but enforce a looser one (see ENFORCED_STREAM_LIMIT).
        self.conn.local_settings = Settings(
            client=False,
            initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: ENFORCED_STREAM_LIMIT},
        )
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.fake._closed(self)

    def close(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.conn.close_connection()
            self.transport.write(self.conn.data_to_send())
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self._flush()
            self.close()
            return
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream[1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, RequestReceived):
                self.streams[event.stream_id] = (list(event.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(event, StreamEnded):
                self._request_complete(event.stream_id)
            elif isinstance(event, StreamReset):
                self.fake.streams_reset += 1
                self.streams.pop(event.stream_id, None)
                self.blocked.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                self._send_blocked()
            elif isinstance(event, ConnectionTerminated):
                self._flush()
                if self.transport is not None:
                    self.transport.close()
                return
        self._flush()

    def _request_complete(self, stream_id: int) -> None:
        raw_headers, body = self.streams.pop(stream_id)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw_headers}
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        status, reason, extra = self.fake._decide(self, headers, bytes(body))
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        path = headers.get(":path", "")
        self.fake._record(
            RecordedRequest(
                token=path[len(DEVICE_PATH) :] if path.startswith(DEVICE_PATH) else "",
                headers=headers,
                body=payload,
                status=status,
                reason=reason,
                connection=self.serial,
            )
        )
        delay = self.fake.delay
        if delay > 0:
            self.loop.call_later(delay, self._answer, stream_id, apns_id, status, reason, extra)
        else:
            self._answer(stream_id, apns_id, status, reason, extra, flush=False)

    def _answer(
        self,
        stream_id: int,
        apns_id: str,
        status: int,
        reason: str | None,
        extra: dict[str, str],
        flush: bool = True,
    ) -> None:
        if self.is_closed:
            return
        headers = [(b":status", str(status).encode()), (b"apns-id", apns_id.encode())]
        headers.extend((k.lower().encode(), str(v).encode()) for k, v in extra.items())
        try:
            if status == RESET_STREAM:
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            elif status == 200:
                if self.fake.streams_once_accepted is not None and not self.streams_raised:
                    self.streams_raised = True
                    self.conn.update_settings(
                        {SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.streams_once_accepted}
                    )
                self.conn.send_headers(stream_id, headers, end_stream=True)
            else:
                document: dict[str, Any] = {"reason": reason or "Unknown"}
                if status == 410:
                    document["timestamp"] = int(time.time() * 1000)
                data = json.dumps(document).encode()
                headers.append((b"content-type", b"application/json"))
                headers.append((b"content-length", str(len(data)).encode()))
                self.conn.send_headers(stream_id, headers)
                self.blocked[stream_id] = data
                self._send_blocked()
        except H2Error:
            # The client reset the stream or the connection is going away.
            self.blocked.pop(stream_id, None)
        if flush:
            self._schedule_flush()

    def _send_blocked(self) -> None:
        for stream_id, data in list(self.blocked.items()):
            try:
                if self.conn.local_flow_control_window(stream_id) < len(data):
                    continue
                self.conn.send_data(stream_id, data, end_stream=True)
            except H2Error:
                pass
            del self.blocked[stream_id]

    def _schedule_flush(self) -> None:
        # Answers released by timers in the same loop pass share one write.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.is_closed:
            self.transport.write(data)
