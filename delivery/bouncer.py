"""Client for a Zulip-compatible push notification bouncer (``/api/v1/remotes/push/...``).

A bouncer relays pushes for servers that hold no APNs/FCM credentials of their own. It
knows this server by its UUID and API key (HTTP Basic auth) and keeps its own copy of the
device registrations, so devices are registered and unregistered there too.

Wire format, as Zulip servers speak it:

- ``push/notify``: a JSON body with ``user_id``, ``user_uuid``, ``realm_uuid``,
  ``apns_payload``, ``gcm_payload``, ``gcm_options``, ``android_devices`` and
  ``apple_devices`` (the tokens this server believes are registered). The answer names
  the devices the bouncer has dropped (``deleted_devices``): delete them here too.
- ``push/register`` and ``push/unregister``: form fields (``user_id``, ``user_uuid``,
  ``realm_uuid``, ``token``, ``token_kind`` = 1 for APNs / 2 for FCM, ``ios_app_id``).
- Answers are ``{"result": "success", "msg": "", ...}`` or
  ``{"result": "error", "msg": "...", "code": "..."}``.

Errors: timeouts, connection failures, 5xx and 429 raise `TransientDeliveryError` (with
``Retry-After`` when the bouncer sent one); any other 4xx raises `BouncerRequestError`, a
`PermanentDeliveryError` carrying the bouncer's ``msg``. Device tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError, parse_retry_after

log = logging.getLogger(__name__)

# Path under the bouncer's base URL where the remote-server API lives.
API_PREFIX = "/api/v1/remotes/"
# Zulip's numeric token kinds (PushDeviceToken.APNS / .FCM, the latter once called GCM).
TOKEN_KIND_APNS = 1
TOKEN_KIND_FCM = 2
# herald's device kinds to the bouncer's token_kind numbers.
TOKEN_KINDS: dict[str, int] = {"apns": TOKEN_KIND_APNS, "fcm": TOKEN_KIND_FCM}
# Statuses below 500 that still mean "try again later".
TRANSIENT_STATUSES = frozenset({408, 429})
# User-Agent sent to the bouncer.
USER_AGENT = "herald-push-client"
# Longest bouncer message kept in an error's reason.
MAX_REASON_CHARS = 300
# What the bouncer answers (a 400) to an unregister of a token it does not have.
UNKNOWN_TOKEN_MSG = "Token does not exist"

TokenKind = Literal["apns", "fcm"]


@dataclass(frozen=True)
class BouncerResult:
    """The bouncer's answer to a notify request.

    Parameters:
      total_android_devices: FCM devices the bouncer found registered for the user.
      total_apple_devices: APNs devices likewise.
      deleted_android_devices: tokens sent in ``android_devices`` the bouncer no longer
        has (it dropped them, e.g. after FCM said UNREGISTERED): delete them locally.
      deleted_apple_devices: likewise for ``apple_devices``.
      realm: the bouncer's ``realm`` entry (plan status), if it sent one.
    """

    total_android_devices: int = 0
    total_apple_devices: int = 0
    deleted_android_devices: list[str] = field(default_factory=list)
    deleted_apple_devices: list[str] = field(default_factory=list)
    realm: dict[str, Any] | None = None


class BouncerRequestError(PermanentDeliveryError):
    """The bouncer refused the request (a 4xx); `reason` is its ``msg``.

    Parameters:
      reason: the bouncer's message.
      status: the HTTP status.
      code: the bouncer's error code (e.g. ``"INVALID_ZULIP_SERVER"``), if any.
    """

    def __init__(self, reason: str, *, status: int, code: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code


class BouncerClient:
    """Talks to a push bouncer over HTTPS (or HTTP) with httpx.

    Parameters:
      url: the bouncer's base URL, e.g. ``https://push.zulipchat.com``.
      server_uuid: this server's UUID at the bouncer (Basic auth user name).
      api_key: this server's API key at the bouncer (Basic auth password).
      timeout: seconds allowed for each request, from sending it to its whole answer.
    """

    def __init__(self, url: str, server_uuid: str, api_key: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=self.url + API_PREFIX,
            auth=httpx.BasicAuth(server_uuid, api_key),
            timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            http2=True,
        )

    async def __aenter__(self) -> BouncerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def notify(
        self,
        *,
        user_id: int,
        user_uuid: str | None,
        realm_uuid: str | None,
        apns_payload: Mapping[str, Any],
        gcm_payload: Mapping[str, Any],
        gcm_options: Mapping[str, Any],
        android_devices: list[str],
        apple_devices: list[str],
    ) -> BouncerResult:
        """Ask the bouncer to push to every device it has registered for the user."""
        body: dict[str, Any] = {
            "user_id": user_id,
            "user_uuid": user_uuid,
            "realm_uuid": realm_uuid,
            "apns_payload": dict(apns_payload),
            "gcm_payload": dict(gcm_payload),
            "gcm_options": dict(gcm_options),
            "android_devices": list(android_devices),
            "apple_devices": list(apple_devices),
        }
        answer = await self._post("push/notify", json=body)
        deleted = answer.get("deleted_devices")
        if not isinstance(deleted, dict):
            deleted = {}
        realm = answer.get("realm")
        return BouncerResult(
            total_android_devices=_as_int(answer.get("total_android_devices")),
            total_apple_devices=_as_int(answer.get("total_apple_devices")),
            deleted_android_devices=_as_str_list(deleted.get("android_devices")),
            deleted_apple_devices=_as_str_list(deleted.get("apple_devices")),
            realm=realm if isinstance(realm, dict) else None,
        )

    async def register(
        self,
        *,
        user_id: int,
        user_uuid: str | None,
        token: str,
        token_kind: TokenKind,
        ios_app_id: str | None = None,
        realm_uuid: str | None = None,
    ) -> None:
        """Register a device with the bouncer (``ios_app_id`` is required for APNs)."""
        if token_kind == "apns" and not ios_app_id:
            raise ValueError("ios_app_id is required for an apns device")
        fields = _identity_fields(user_id, user_uuid, realm_uuid)
        fields.update(token=token, token_kind=str(_kind_number(token_kind)))
        if token_kind == "apns" and ios_app_id:
            fields["ios_app_id"] = ios_app_id
        await self._post("push/register", data=fields)

    async def unregister(
        self,
        *,
        user_id: int,
        user_uuid: str | None,
        token: str,
        token_kind: TokenKind,
        realm_uuid: str | None = None,
    ) -> None:
        """Remove a device registration. A token the bouncer does not have (it dropped
        it after the provider called it invalid, or its registration never got there)
        is already where this call would put it: done, not a failure to dead-letter."""
        fields = _identity_fields(user_id, user_uuid, realm_uuid)
        fields.update(token=token, token_kind=str(_kind_number(token_kind)))
        try:
            await self._post("push/unregister", data=fields)
        except BouncerRequestError as error:
            if error.status != 400 or error.reason != UNKNOWN_TOKEN_MSG:
                raise
            log.info("bouncer push/unregister: the bouncer has no such %s token; "
                     "nothing to remove", token_kind)

    async def close(self) -> None:
        await self._client.aclose()

    async def _post(
        self,
        endpoint: str,
        *,
        json: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            # httpx's timeout bounds each step (connect, each read); this bounds the whole.
            response = await asyncio.wait_for(
                self._client.post(endpoint, json=json, data=data), self._timeout
            )
        except (httpx.TimeoutException, TimeoutError) as error:
            raise TransientDeliveryError(
                f"bouncer {endpoint}: timeout ({type(error).__name__})"
            ) from error
        except httpx.HTTPError as error:
            # Transport errors, and answers that cannot be decoded (a proxy's bad gzip).
            raise TransientDeliveryError(
                f"bouncer {endpoint}: connection error ({type(error).__name__})"
            ) from error
        status = response.status_code
        answer = _json_object(response)
        if status >= 500 or status in TRANSIENT_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is None:
                retry_after = _as_float(answer.get("retry-after"))
            reason = _reason(endpoint, status, answer)
            log.warning("bouncer %s: HTTP %d", endpoint, status)
            raise TransientDeliveryError(reason, retry_after)
        if status >= 400:
            code = answer.get("code")
            msg = answer.get("msg")
            reason = msg if isinstance(msg, str) and msg else f"HTTP {status}"
            log.warning("bouncer %s refused: HTTP %d %s", endpoint, status, code or "")
            raise BouncerRequestError(
                _truncate(reason), status=status, code=code if isinstance(code, str) else None
            )
        if status != 200:
            raise PermanentDeliveryError(f"bouncer {endpoint}: unexpected HTTP {status}")
        if answer.get("result") != "success":
            raise TransientDeliveryError(f"bouncer {endpoint}: unreadable answer")
        return answer


def _identity_fields(user_id: int, user_uuid: str | None, realm_uuid: str | None) -> dict[str, str]:
    # Form values are JSON-decoded by the bouncer (`Json[int]`), so an int goes as "7".
    fields = {"user_id": str(int(user_id))}
    if user_uuid:
        fields["user_uuid"] = user_uuid
    if realm_uuid:
        fields["realm_uuid"] = realm_uuid
    return fields


def _kind_number(token_kind: str) -> int:
    try:
        return TOKEN_KINDS[token_kind]
    except KeyError:
        raise ValueError(f"token_kind must be one of {sorted(TOKEN_KINDS)}") from None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _reason(endpoint: str, status: int, answer: Mapping[str, Any]) -> str:
    msg = answer.get("msg")
    reason = f"bouncer {endpoint}: HTTP {status}"
    if isinstance(msg, str) and msg:
        reason += f": {msg}"
    return _truncate(reason)


def _as_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _as_float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _as_str_list(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]




def _truncate(text: str) -> str:
    if len(text) <= MAX_REASON_CHARS:
        return text
    return text[: MAX_REASON_CHARS - 1] + "…"
