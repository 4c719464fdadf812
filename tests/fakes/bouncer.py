"""A local stand-in for a Zulip push notification bouncer.

`FakeBouncer` is a real HTTP server on 127.0.0.1 (uvicorn + starlette in a background
thread) serving the three remote-server endpoints the way Zulip's bouncer does:

- Every request needs HTTP Basic auth with a registered server UUID and its API key;
  otherwise 401 with Zulip's error shape ``{"result": "error", "msg", "code"}``
  (``UNAUTHORIZED`` without credentials, ``INVALID_ZULIP_SERVER`` for an unknown server
  or a wrong key).
- ``POST /api/v1/remotes/push/register`` and ``.../push/unregister``: form fields
  (``user_id`` / ``user_uuid``, ``token``, ``token_kind`` 1 = APNs / 2 = FCM,
  ``ios_app_id``); registrations are kept per server. Unregistering an unknown token is
  a 400 (``Token does not exist``).
- ``POST /api/v1/remotes/push/notify``: a JSON body. The fake "sends" to every device
  registered for the user; a token marked with `mark_dead` fails the way FCM/APNs
  would, and its registration is dropped. The answer counts the user's devices and lists
  in ``deleted_devices`` the tokens the caller sent that the bouncer no longer has.

`fail_next(status, n)` makes the next n requests fail with that status; `delay` slows
every answer (for timeout tests). Everything received is in `requests`; every push the
bouncer would have made is in `pushes`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.fcm import LoopbackServer

# Zulip's token_kind numbers.
TOKEN_KIND_APNS = 1
TOKEN_KIND_FCM = 2
# Longest device token the bouncer accepts.
MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True)
class BouncerRequest:
    """One request received (after parsing), whatever its answer."""

    endpoint: str
    server_uuid: str | None
    fields: dict[str, Any]
    status: int


@dataclass
class Registration:
    """One device registration held by the bouncer."""

    server_uuid: str
    kind: int
    token: str
    user_id: int | None = None
    user_uuid: str | None = None
    ios_app_id: str | None = None


@dataclass(frozen=True)
class Push:
    """One push the bouncer would have handed to FCM or APNs."""

    kind: int
    token: str
    payload: dict[str, Any]
    delivered: bool


@dataclass
class _Failure:
    status: int
    remaining: int
    msg: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)


class FakeBouncer:
    """Fake Zulip push bouncer on 127.0.0.1.

    Parameters:
      server_uuid, api_key: the one server registered at start (generated if omitted);
        `add_server` registers more.
      delay: seconds every request waits before being answered.
    """

    def __init__(
        self, server_uuid: str | None = None, api_key: str | None = None, *, delay: float = 0.0
    ) -> None:
        self.server_uuid = server_uuid or str(uuid.uuid4())
        self.api_key = api_key or secrets.token_urlsafe(32)
        self.delay = delay
        self.requests: list[BouncerRequest] = []
        self.pushes: list[Push] = []
        self.registrations: list[Registration] = []
        self._servers: dict[str, str] = {self.server_uuid: self.api_key}
        self._dead: set[str] = set()
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/api/v1/remotes/push/register", self._register, methods=["POST"]),
                Route("/api/v1/remotes/push/unregister", self._unregister, methods=["POST"]),
                Route("/api/v1/remotes/push/notify", self._notify, methods=["POST"]),
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

    def __enter__(self) -> FakeBouncer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- set-up and inspection ---------------------------------------------------------

    def add_server(self, server_uuid: str, api_key: str) -> None:
        with self._lock:
            self._servers[server_uuid] = api_key

    def mark_dead(self, token: str) -> None:
        """Pushes to `token` fail as Unregistered; the bouncer then drops the device."""
        with self._lock:
            self._dead.add(token)

    def fail_next(
        self,
        status: int,
        n: int = 1,
        *,
        msg: str | None = None,
        code: str = "BAD_REQUEST",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next `n` requests (any endpoint) with `status` and an error body."""
        with self._lock:
            self._failures.append(
                _Failure(
                    status=status,
                    remaining=n,
                    msg=msg or ("Internal server error" if status >= 500 else "Bad request"),
                    code=code,
                    headers=dict(headers or {}),
                )
            )

    def add_device(
        self,
        kind: int,
        token: str,
        *,
        user_id: int | None = None,
        user_uuid: str | None = None,
        ios_app_id: str | None = None,
        server_uuid: str | None = None,
    ) -> None:
        """Register a device directly, as if through push/register."""
        with self._lock:
            self.registrations.append(
                Registration(
                    server_uuid=server_uuid or self.server_uuid,
                    kind=kind,
                    token=token,
                    user_id=user_id if user_uuid is None else None,
                    user_uuid=user_uuid,
                    ios_app_id=ios_app_id,
                )
            )

    def forget(self, token: str) -> None:
        """Drop a token's registrations, as the bouncer does when its provider calls
        the token invalid."""
        with self._lock:
            self.registrations = [r for r in self.registrations if r.token != token]

    def devices(self, server_uuid: str | None = None) -> list[Registration]:
        """A snapshot of one server's registrations."""
        wanted = server_uuid or self.server_uuid
        with self._lock:
            return [r for r in self.registrations if r.server_uuid == wanted]

    def received(self, endpoint: str | None = None) -> list[BouncerRequest]:
        """A snapshot of `requests`, optionally only those to `endpoint` (e.g. "push/notify")."""
        with self._lock:
            return [r for r in self.requests if endpoint is None or r.endpoint == endpoint]

    # -- plumbing ----------------------------------------------------------------------

    async def _begin(
        self, request: Request, endpoint: str
    ) -> tuple[str | None, bytes, Response | None]:
        """Delay, scripted failure and auth; returns (server, body, early answer)."""
        if self.delay:
            await asyncio.sleep(self.delay)
        body = await request.body()
        with self._lock:
            failure = self._failures[0] if self._failures else None
            if failure is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.pop(0)
        if failure is not None:
            return None, body, _error(failure.status, failure.msg, failure.code, failure.headers)
        server_uuid, refusal = self._authenticate(request)
        return server_uuid, body, refusal

    def _authenticate(self, request: Request) -> tuple[str | None, Response | None]:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            if scheme.lower() != "basic":
                raise ValueError("not basic auth")
            role, sep, key = base64.b64decode(encoded, validate=True).decode().partition(":")
            if not sep:
                raise ValueError("no password")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None, _error(
                401,
                "Not logged in: API authentication or user session required",
                "UNAUTHORIZED",
                {"WWW-Authenticate": 'Basic realm="zulip"'},
            )
        role, key = role.strip(), key.strip()
        with self._lock:
            expected = self._servers.get(role)
        if expected is None:
            return None, _error(
                401,
                f"Zulip server auth failure: {role} is not a registered server",
                "INVALID_ZULIP_SERVER",
                extra={"role": role},
            )
        if not secrets.compare_digest(key, expected):
            return None, _error(
                401,
                f"Zulip server auth failure: wrong API key for {role}",
                "INVALID_ZULIP_SERVER",
                extra={"role": role},
            )
        return role, None

    def _record(
        self, endpoint: str, server: str | None, fields: dict[str, Any], status: int
    ) -> None:
        with self._lock:
            self.requests.append(BouncerRequest(endpoint, server, fields, status))

    # -- endpoints ---------------------------------------------------------------------

    async def _register(self, request: Request) -> Response:
        endpoint = "push/register"
        server, body, early = await self._begin(request, endpoint)
        fields = _form(body)
        if early is not None:
            self._record(endpoint, server, fields, early.status_code)
            return early
        assert server is not None
        try:
            kind, token = _token_fields(fields)
            user_id, user_uuid = _identity(fields)
            ios_app_id = fields.get("ios_app_id") or None
            if kind == TOKEN_KIND_APNS and ios_app_id is None:
                raise _BadRequest("Missing ios_app_id")
        except _BadRequest as bad:
            self._record(endpoint, server, fields, 400)
            return _error(400, str(bad))
        with self._lock:
            if user_id is not None and user_uuid is not None:
                # Like Zulip: a uuid registration replaces the old user_id one.
                self.registrations = [
                    r
                    for r in self.registrations
                    if not (
                        r.server_uuid == server
                        and r.kind == kind
                        and r.token == token
                        and r.user_id == user_id
                    )
                ]
                user_id = None
            exists = any(
                r.server_uuid == server
                and r.kind == kind
                and r.token == token
                and r.user_id == user_id
                and r.user_uuid == user_uuid
                for r in self.registrations
            )
            if not exists:
                self.registrations.append(
                    Registration(server, kind, token, user_id, user_uuid, ios_app_id)
                )
        self._record(endpoint, server, fields, 200)
        return _success()

    async def _unregister(self, request: Request) -> Response:
        endpoint = "push/unregister"
        server, body, early = await self._begin(request, endpoint)
        fields = _form(body)
        if early is not None:
            self._record(endpoint, server, fields, early.status_code)
            return early
        assert server is not None
        try:
            kind, token = _token_fields(fields)
            user_id, user_uuid = _identity(fields)
        except _BadRequest as bad:
            self._record(endpoint, server, fields, 400)
            return _error(400, str(bad))
        with self._lock:
            keep = [
                r
                for r in self.registrations
                if not (
                    r.server_uuid == server
                    and r.kind == kind
                    and r.token == token
                    and _matches(r, user_id, user_uuid)
                )
            ]
            removed = len(self.registrations) - len(keep)
            self.registrations = keep
        if removed == 0:
            self._record(endpoint, server, fields, 400)
            return _error(400, "Token does not exist")
        self._record(endpoint, server, fields, 200)
        return _success()

    async def _notify(self, request: Request) -> Response:
        endpoint = "push/notify"
        server, body, early = await self._begin(request, endpoint)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = None
        fields = payload if isinstance(payload, dict) else {}
        if early is not None:
            self._record(endpoint, server, fields, early.status_code)
            return early
        assert server is not None
        if not isinstance(payload, dict):
            self._record(endpoint, server, fields, 400)
            return _error(400, "Malformed JSON")
        user_id = payload.get("user_id")
        user_uuid = payload.get("user_uuid")
        if not isinstance(user_id, int) and not isinstance(user_uuid, str):
            self._record(endpoint, server, fields, 400)
            return _error(400, "Missing user_id or user_uuid")
        sent_android = _str_list(payload.get("android_devices"))
        sent_apple = _str_list(payload.get("apple_devices"))
        gcm_payload = payload.get("gcm_payload") or {}
        apns_payload = payload.get("apns_payload") or {}
        uid = user_id if isinstance(user_id, int) else None
        uuuid = user_uuid if isinstance(user_uuid, str) else None
        with self._lock:
            mine = [
                r for r in self.registrations if r.server_uuid == server and _matches(r, uid, uuuid)
            ]
            android = [r for r in mine if r.kind == TOKEN_KIND_FCM]
            apple = [r for r in mine if r.kind == TOKEN_KIND_APNS]
            for device in android + apple:
                dead = device.token in self._dead
                self.pushes.append(
                    Push(
                        device.kind,
                        device.token,
                        dict(gcm_payload if device.kind == TOKEN_KIND_FCM else apns_payload),
                        delivered=not dead,
                    )
                )
                if dead:
                    self.registrations.remove(device)
            still_android = {
                r.token
                for r in self.registrations
                if r.server_uuid == server and r.kind == TOKEN_KIND_FCM and _matches(r, uid, uuuid)
            }
            still_apple = {
                r.token
                for r in self.registrations
                if r.server_uuid == server and r.kind == TOKEN_KIND_APNS and _matches(r, uid, uuuid)
            }
        self._record(endpoint, server, fields, 200)
        return _success(
            {
                "total_android_devices": len(android),
                "total_apple_devices": len(apple),
                "deleted_devices": {
                    "android_devices": [t for t in sent_android if t not in still_android],
                    "apple_devices": [t for t in sent_apple if t not in still_apple],
                },
                "realm": None,
            }
        )


class _BadRequest(Exception):
    pass


def _form(body: bytes) -> dict[str, Any]:
    parsed = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[-1] for key, values in parsed.items()}


def _json_int(value: str | None, name: str) -> int | None:
    """A form value the bouncer JSON-decodes into an int (`Json[int]`)."""
    if value is None or value == "":
        return None
    try:
        number = json.loads(value)
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool):
        raise _BadRequest(f"{name} is not an integer")
    return number


def _token_fields(fields: Mapping[str, Any]) -> tuple[int, str]:
    kind = _json_int(fields.get("token_kind"), "token_kind")
    if kind is None:
        raise _BadRequest("Missing 'token_kind' argument")
    token = fields.get("token") or ""
    if kind not in (TOKEN_KIND_APNS, TOKEN_KIND_FCM):
        raise _BadRequest("Invalid token type")
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise _BadRequest("Empty or invalid length token")
    if kind == TOKEN_KIND_APNS:
        try:
            bytes.fromhex(token)
        except ValueError:
            raise _BadRequest("Invalid APNS token") from None
    return kind, token


def _identity(fields: Mapping[str, Any]) -> tuple[int | None, str | None]:
    user_id = _json_int(fields.get("user_id"), "user_id")
    user_uuid = fields.get("user_uuid") or None
    if user_id is None and user_uuid is None:
        raise _BadRequest("Missing user_id or user_uuid")
    return user_id, user_uuid


def _matches(registration: Registration, user_id: int | None, user_uuid: str | None) -> bool:
    """Zulip's compatibility rule: a registration by uuid or by (legacy) user id."""
    return (user_uuid is not None and registration.user_uuid == user_uuid) or (
        user_id is not None and registration.user_id == user_id
    )


def _str_list(value: object) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _success(data: Mapping[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"result": "success", "msg": "", **(data or {})})


def _error(
    status: int,
    msg: str,
    code: str = "BAD_REQUEST",
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body = {"result": "error", "msg": msg, "code": code, **(extra or {})}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))
