"""A local stand-in for Google's OAuth2 token endpoint and the FCM HTTP v1 send API.

`FakeFcm` is a real HTTP server (uvicorn + starlette, plain HTTP) on 127.0.0.1 in a
background thread, so firebase-admin and google-auth talk to it exactly as they would to
Google:

- ``POST /token``: the OAuth2 JWT-bearer grant. The assertion's RS256 signature is checked
  against the public key of a trusted service account (``iss`` = its ``client_email``),
  as are ``aud`` (Google's token URL, which google-auth always uses, or this endpoint's)
  and ``exp``; the answer is
  ``{"access_token", "expires_in": 3600, "token_type": "Bearer"}`` or Google's
  ``{"error": "invalid_grant", ...}`` with status 400.
- ``POST /v1/projects/{project}/messages:send``: checks the bearer token (and that it was
  issued for that project), records the message in `requests`, and answers
  ``{"name": "projects/<project>/messages/<id>"}``, or the next scripted answer for that
  device token, with FCM v1's error body (``google.firebase.fcm.v1.FcmError`` detail).

Typical use::

    fake = FakeFcm()
    base_url = fake.start()
    path = fake.new_service_account(tmp_path)      # written and trusted
    fake.script("tok", [(404, "UNREGISTERED", {})])
    ...
    fake.stop()

`LoopbackServer` (the thread running uvicorn) is shared with the bouncer fake.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

# Grant type google-auth uses for service-account assertions.
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Audience google-auth puts in every service-account assertion, whatever the token_uri.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
# Lifetime of issued access tokens, in seconds.
ACCESS_TOKEN_LIFETIME = 3600
# `@type` of the detail that carries FCM's own error code.
FCM_ERROR_DETAIL_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# Canonical Google API status for each HTTP status the fake may answer.
CANONICAL_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# HTTP status FCM uses for each of its error codes (when a script gives no status).
FCM_CODE_STATUS = {
    "INVALID_ARGUMENT": 400,
    "THIRD_PARTY_AUTH_ERROR": 401,
    "SENDER_ID_MISMATCH": 403,
    "UNREGISTERED": 404,
    "QUOTA_EXCEEDED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}
# Human-readable message the fake puts in each error body.
FCM_CODE_MESSAGE = {
    "INVALID_ARGUMENT": "The registration token is not a valid FCM registration token",
    "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
    "SENDER_ID_MISMATCH": "SenderId mismatch",
    "UNREGISTERED": "Requested entity was not found.",
    "QUOTA_EXCEEDED": "Message rate exceeded for this device.",
    "INTERNAL": "Internal error encountered.",
    "UNAVAILABLE": "The service is currently unavailable.",
}
# Seconds `LoopbackServer.start` waits for uvicorn to come up.
STARTUP_TIMEOUT = 10.0
# Listen backlog, so hundreds of simultaneous connects are not refused.
LISTEN_BACKLOG = 2048

# One scripted answer: (HTTP status, FCM error code or None, extra response headers).
ScriptedAnswer = tuple[int, str | None, Mapping[str, str]]


class LoopbackServer:
    """Runs an ASGI app under uvicorn on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``)."""
        if self._thread is not None:
            return self.url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(LISTEN_BACKLOG)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            backlog=LISTEN_BACKLOG,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-server", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the thread to finish."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None


@dataclass(frozen=True)
class ServiceAccount:
    """What the fake knows about a trusted service account."""

    client_email: str
    project_id: str
    public_key: Any


@dataclass(frozen=True)
class FcmRequest:
    """One message received on the send endpoint."""

    project: str
    token: str | None
    data: dict[str, str]
    priority: str | None
    status: int
    message: dict[str, Any] = field(default_factory=dict)


def make_service_account(
    directory: str | os.PathLike[str],
    token_uri: str,
    project_id: str = "herald-test",
    *,
    client_email: str | None = None,
    private_key_id: str | None = None,
    filename: str | None = None,
) -> str:
    """Generate an RSA key and write a service-account JSON file; returns its path."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = client_email or f"herald-sender@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id or secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    name = filename or f"service-account-{secrets.token_hex(4)}.json"
    path = os.path.join(os.fspath(directory), name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return path


class FakeFcm:
    """Fake OAuth2 token endpoint + FCM v1 send endpoint on 127.0.0.1.

    Attributes:
      requests: every message received on the send endpoint (`FcmRequest`), in arrival
        order; appended under a lock, read it with `sent()` for a snapshot.
      token_grants: number of access tokens issued; token_refusals: assertions refused.
      delay: seconds every send waits before answering (0 by default).
      delays: seconds a send to a given token waits before answering, in place of
        `delay` (a slow device beside fast ones).
      token_delay: seconds the token endpoint waits before answering (0 by default).
      unauthenticated: sends answered 401 for want of a valid access token.
    """

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.delays: dict[str, float] = {}
        self.requests: list[FcmRequest] = []
        # Tokens of sends as they arrive, before `delay` holds them: "in flight".
        self.arrived: list[str | None] = []
        self.token_delay = 0.0
        self.token_grants = 0
        self.token_refusals = 0
        self.unauthenticated = 0
        self._lock = threading.Lock()
        self._accounts: dict[str, ServiceAccount] = {}
        self._access_tokens: dict[str, ServiceAccount] = {}
        self._scripts: dict[str, collections.deque[ScriptedAnswer]] = {}
        self._ids = itertools.count(1)
        app = Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
            ]
        )
        self._server = LoopbackServer(app)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Start the server; returns its base URL."""
        return self._server.start()

    def stop(self) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    def __enter__(self) -> FakeFcm:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- set-up ------------------------------------------------------------------------

    def trust(self, credentials_file: str | os.PathLike[str]) -> None:
        """Accept assertions signed by this service account's key."""
        with open(credentials_file, encoding="utf-8") as handle:
            info = json.load(handle)
        private_key = serialization.load_pem_private_key(
            info["private_key"].encode(), password=None
        )
        account = ServiceAccount(
            client_email=info["client_email"],
            project_id=info["project_id"],
            public_key=private_key.public_key(),
        )
        with self._lock:
            self._accounts[account.client_email] = account

    def new_service_account(
        self, directory: str | os.PathLike[str], project_id: str = "herald-test", **kwargs: Any
    ) -> str:
        """Write a service-account file whose token_uri is this fake, and trust it."""
        path = make_service_account(directory, self.token_uri, project_id, **kwargs)
        self.trust(path)
        return path

    def script(self, token: str, answers: Iterable[ScriptedAnswer]) -> None:
        """Queue answers for sends to `token`, used in order; then default success.

        Each answer is ``(status, fcm_error_code_or_None, headers)``; a status of 0 means
        "FCM's usual status for that error code".
        """
        with self._lock:
            queue = self._scripts.setdefault(token, collections.deque())
            queue.extend((status, code, dict(headers)) for status, code, headers in answers)

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued so far, as Google does when a service
        account's key is rotated: sends carrying one are answered 401 until the client
        fetches a new token."""
        with self._lock:
            self._access_tokens.clear()

    def distrust_all(self) -> None:
        """Refuse every service account's assertions from now on, as Google does once
        a key is deleted."""
        with self._lock:
            self._accounts.clear()

    def sent(self) -> list[FcmRequest]:
        """A snapshot of `requests`."""
        with self._lock:
            return list(self.requests)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.arrived.clear()

    # -- endpoints ---------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        form = urllib.parse.parse_qs((await request.body()).decode("ascii", "replace"))
        grant_type = form.get("grant_type", [""])[0]
        assertion = form.get("assertion", [""])[0]
        if grant_type != JWT_BEARER_GRANT or not assertion:
            return self._refuse("unsupported_grant_type", "Invalid grant_type.")
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._refuse("invalid_grant", "Invalid JWT.")
        with self._lock:
            account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            return self._refuse("invalid_grant", "Invalid JWT: unknown issuer.")
        try:
            jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=[self.token_uri, GOOGLE_TOKEN_AUDIENCE],
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidSignatureError:
            return self._refuse("invalid_grant", "Invalid JWT Signature.")
        except jwt.PyJWTError as error:
            return self._refuse("invalid_grant", f"Invalid JWT: {type(error).__name__}.")
        access_token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens[access_token] = account
            self.token_grants += 1
        return JSONResponse(
            {
                "access_token": access_token,
                "expires_in": ACCESS_TOKEN_LIFETIME,
                "token_type": "Bearer",
            }
        )

    def _refuse(self, error: str, description: str) -> Response:
        with self._lock:
            self.token_refusals += 1
        return JSONResponse({"error": error, "error_description": description}, status_code=400)

    async def _send(self, request: Request) -> Response:
        project = request.path_params["project"]
        authorization = request.headers.get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        with self._lock:
            account = self._access_tokens.get(credential) if scheme == "Bearer" else None
        if account is None:
            with self._lock:
                self.unauthenticated += 1
            return _google_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )
        if account.project_id != project:
            return _google_error(
                403, f"Permission 'cloudmessaging.messages.create' denied on project {project}"
            )
        try:
            body = json.loads(await request.body())
            message = body["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, TypeError):
            return _fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        token = message.get("token")
        data = message.get("data") or {}
        android = message.get("android") or {}
        priority = android.get("priority") if isinstance(android, dict) else None

        with self._lock:
            self.arrived.append(token if isinstance(token, str) else None)
        delay = self.delays.get(token, self.delay) if isinstance(token, str) else self.delay
        if delay:
            await asyncio.sleep(delay)

        answer: ScriptedAnswer | None = None
        with self._lock:
            queue = self._scripts.get(token) if isinstance(token, str) else None
            if queue:
                answer = queue.popleft()
        if answer is not None:
            status, code, headers = answer
            status = status or FCM_CODE_STATUS.get(code or "", 500)
        elif not _valid_target(token, data):
            status, code, headers = 400, "INVALID_ARGUMENT", {}
        else:
            status, code, headers = 200, None, {}

        record = FcmRequest(
            project=project,
            token=token if isinstance(token, str) else None,
            data=dict(data) if isinstance(data, dict) else {},
            priority=priority,
            status=status,
            message=message,
        )
        with self._lock:
            self.requests.append(record)
        if status < 400:
            name = f"projects/{project}/messages/0:{int(time.time())}%{next(self._ids):08d}"
            return JSONResponse({"name": name}, status_code=status, headers=dict(headers))
        if code is None:
            return _google_error(status, "Request failed.", headers)
        return _fcm_error(status, code, FCM_CODE_MESSAGE.get(code, code), headers)


def _valid_target(token: object, data: object) -> bool:
    """A non-empty device token and string-to-string data, as FCM requires."""
    return (
        isinstance(token, str)
        and bool(token)
        and isinstance(data, dict)
        and all(isinstance(key, str) and isinstance(value, str) for key, value in data.items())
    )


def _google_error(
    status: int, message: str, headers: Mapping[str, str] | None = None, details: Any = None
) -> JSONResponse:
    """A Google API error body: ``{"error": {"code", "message", "status", "details"?}}``."""
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": CANONICAL_STATUS.get(status, "UNKNOWN"),
    }
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


def _fcm_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An FCM v1 error body, with the FcmError detail naming `code`."""
    details: list[dict[str, Any]] = [{"@type": FCM_ERROR_DETAIL_TYPE, "errorCode": code}]
    if code == "INVALID_ARGUMENT":
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": message}],
            }
        )
    return _google_error(status, message, headers, details)
