"""Firebase Cloud Messaging (HTTP v1) sender, built on firebase-admin's async messaging API.

Every `FcmSender` owns its own firebase-admin app (named ``<app_name>-<n>``), so several
senders with different credentials or endpoints can live in one process. The endpoint
override is applied to that app's messaging service only: firebase-admin builds the send
URL from ``messaging._MessagingService.FCM_URL`` when the service is first made, so the
class attribute is swapped under a lock for exactly that moment, and the URL stored on the
service instance is then checked and pinned.

firebase-admin's async HTTP client retries 500/503 answers itself (up to four times, with
back-off); here it is replaced by one that sends each request once, because retries belong
to the caller (Dramatiq's back-off, with ``Retry-After`` as a floor). Its auth flow is
replaced too (`delivery._fcm_auth`): OAuth2 access tokens come from the service account's
``token_uri``, and google-auth fetches them with blocking I/O, so a token that is missing,
about to expire or answered 401 is fetched in a worker thread, never on the event loop.

Tokens and payload content never reach the logs; results carry FCM's error code, HTTP
status and FCM's error message only.

An `FcmSender` is used from one event loop at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import firebase_admin
import google.auth.exceptions
import httpx
from firebase_admin import _http_client, messaging
from firebase_admin import _retry as firebase_retry
from firebase_admin import credentials as firebase_credentials
from firebase_admin import exceptions as firebase_exceptions
from google.auth.transport import requests as google_auth_requests

from delivery._fcm_auth import AccessToken, AccessTokenAuth, AccessTokenError
from delivery.outcomes import DELIVERED, Outcome, SendResult, parse_retry_after

log = logging.getLogger(__name__)

# Path of the FCM HTTP v1 send method; `{0}` is the project id (firebase-admin's template).
SEND_PATH_TEMPLATE = "/v1/projects/{0}/messages:send"
# firebase-admin refuses batches larger than this in send_each_async.
MAX_BATCH_SIZE = 500
# Android message priorities FCM accepts (`AndroidConfig.priority`).
ANDROID_PRIORITIES = frozenset({"high", "normal"})
# `@type` of the error detail that carries FCM's own error code.
FCM_ERROR_DETAIL_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# FCM error codes meaning the registration token is dead: delete the device.
DEAD_TOKEN_ERROR_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
# FCM error codes and canonical statuses worth retrying later.
TRANSIENT_ERROR_CODES = frozenset(
    {"UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
)
# HTTP statuses worth retrying later besides 5xx.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429})
# Longest provider message kept in a result's reason.
MAX_REASON_MESSAGE_CHARS = 200

# firebase-admin 7.7 marks Message.token deprecated in favour of Message.fid (Firebase
# installation IDs). The devices herald knows register FCM registration tokens, which FCM
# v1 still takes as `message.token`, so the token field stays; only that one warning is
# silenced (a process-wide filter, because warnings.catch_warnings is not thread-safe).
warnings.filterwarnings(
    "ignore", message=r"Message\.token is deprecated", category=DeprecationWarning
)

# Serialises the short window in which the class-level FCM_URL is swapped.
_SERVICE_SETUP_LOCK = threading.Lock()
# Source of unique firebase-admin app names.
_APP_SEQUENCE = itertools.count(1)


class _BoundedAuthRequest(google_auth_requests.Request):
    """google-auth transport for the token endpoint, with our timeout instead of 120 s."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def __call__(  # type: ignore[override]
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(
            url, method=method, body=body, headers=headers, timeout=self._timeout, **kwargs
        )


class FcmSender:
    """Sends data messages to Android devices through FCM's HTTP v1 API.

    Parameters:
      credentials_file: path to a service-account JSON file; its ``token_uri`` is where
        access tokens are fetched from.
      project_id: the Firebase project; default: the credentials' ``project_id``.
      endpoint: base URL replacing ``https://fcm.googleapis.com`` (staging, tests),
        e.g. ``"http://127.0.0.1:9099"``.
      timeout: seconds allowed for one HTTP request (token fetch or send).
      app_name: prefix of the firebase-admin app name; a unique suffix is added.

    Raises ``ValueError`` (bad or project-less credentials) and ``OSError`` (unreadable
    file) at construction.
    """

    def __init__(
        self,
        *,
        credentials_file: str,
        project_id: str | None = None,
        endpoint: str | None = None,
        timeout: float = 10.0,
        app_name: str = "herald",
    ) -> None:
        self._timeout = timeout
        try:
            certificate = firebase_credentials.Certificate(credentials_file)
        except (ValueError, OSError) as exc:
            # Named like the other providers' errors, for the start-up check's one line.
            raise ValueError(f"FCM_CREDENTIALS: {' '.join(str(exc).split())}") from None
        options: dict[str, Any] = {"httpTimeout": timeout}
        if project_id:
            options["projectId"] = project_id
        self._app = firebase_admin.initialize_app(
            certificate, options=options, name=f"{app_name}-{next(_APP_SEQUENCE)}"
        )
        try:
            self._service = _make_messaging_service(self._app, endpoint)
            self.project_id: str = self._app.project_id
            # One attempt per request: retries are the caller's business.
            self._client = _http_client.HttpxAsyncClient(
                credential=self._service._credential,
                timeout=timeout,
                retry_config=firebase_retry.HttpxRetry(max_retries=0),
            )
            self._service._async_client = self._client
            self._auth_request = _BoundedAuthRequest(timeout)
            self._client._async_client.auth = AccessTokenAuth(
                AccessToken(self._service._credential, self._auth_request)
            )
        except BaseException:
            firebase_admin.delete_app(self._app)
            raise
        self._closed = False

    async def __aenter__(self) -> FcmSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(self, token: str, *, data: Mapping[str, str], priority: str) -> SendResult:
        """Send one data message to one device.

        `data` values must be strings; `priority` is ``"high"`` or ``"normal"`` and is set
        as the Android priority. Never raises for a provider or network failure: the
        outcome says what happened.
        """
        return (await self.send_many([token], data=data, priority=priority))[0]

    async def send_many(
        self, tokens: Sequence[str], *, data: Mapping[str, str], priority: str
    ) -> list[SendResult]:
        """Send the same data message to several devices; one result per token, in order."""
        if self._closed:
            raise RuntimeError("FcmSender is closed")
        if priority not in ANDROID_PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(ANDROID_PRIORITIES)}")
        if not tokens:
            return []
        android = messaging.AndroidConfig(priority=priority)
        results: list[SendResult] = []
        for start in range(0, len(tokens), MAX_BATCH_SIZE):
            chunk = tokens[start : start + MAX_BATCH_SIZE]
            messages = [
                messaging.Message(token=token, data=dict(data), android=android) for token in chunk
            ]
            try:
                batch = await messaging.send_each_async(messages, dry_run=False, app=self._app)
            except firebase_exceptions.FirebaseError as error:
                results.extend([result_from_error(error)] * len(chunk))
                continue
            results.extend(
                DELIVERED if response.success else result_from_error(response.exception)
                for response in batch.responses
            )
        for result in results:
            if not result.ok:
                log.info("fcm send: %s (%s)", result.outcome.value, result.reason)
        return results

    async def close(self) -> None:
        """Close the HTTP connections and delete this sender's firebase-admin app."""
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()
        # firebase-admin's own cleanup calls asyncio.run(), which needs a thread without
        # a running loop; the client it closes there is already closed.
        await asyncio.to_thread(self._delete_app)

    def _delete_app(self) -> None:
        self._auth_request.session.close()
        self._service._client.close()
        firebase_admin.delete_app(self._app)


def _make_messaging_service(app: firebase_admin.App, endpoint: str | None) -> Any:
    """Create `app`'s messaging service, pointed at `endpoint` when one is given."""
    if endpoint is None:
        return messaging._get_messaging_service(app)
    template = endpoint.rstrip("/") + SEND_PATH_TEMPLATE
    service_class = messaging._MessagingService
    with _SERVICE_SETUP_LOCK:
        original = service_class.FCM_URL
        service_class.FCM_URL = template
        try:
            service = messaging._get_messaging_service(app)
        finally:
            service_class.FCM_URL = original
    # The URL is formatted into the instance when the service is made; pin it there too,
    # in case the service already existed or a firebase-admin version reads it later.
    service._fcm_url = template.format(app.project_id)
    return service


def result_from_error(error: BaseException | None) -> SendResult:
    """Map a firebase-admin or google-auth exception to a `SendResult`."""
    if isinstance(error, firebase_exceptions.FirebaseError):
        response = error.http_response
        if response is not None:
            return _result_from_response(response)
        cause = error.cause
        if isinstance(cause, AccessTokenError):
            return result_from_error(cause.auth_error)
        if isinstance(cause, google.auth.exceptions.GoogleAuthError):
            return result_from_error(cause)
        if isinstance(error, firebase_exceptions.DeadlineExceededError) or isinstance(
            cause, httpx.TimeoutException
        ):
            return SendResult(Outcome.TRANSIENT, "timeout")
        if isinstance(error, firebase_exceptions.UnavailableError) or isinstance(
            cause, httpx.TransportError
        ):
            return SendResult(Outcome.TRANSIENT, f"connection error ({type(cause).__name__})")
        return SendResult(Outcome.TRANSIENT, f"{error.code} ({type(cause).__name__})")
    if isinstance(error, google.auth.exceptions.RefreshError):
        outcome = Outcome.TRANSIENT if error.retryable else Outcome.PERMANENT
        detail = error.args[0] if error.args and isinstance(error.args[0], str) else ""
        return SendResult(outcome, _truncate(f"access token refused: {detail}"))
    if isinstance(error, google.auth.exceptions.GoogleAuthError):
        # TransportError and friends: the token endpoint could not be reached.
        return SendResult(Outcome.TRANSIENT, f"access token: {type(error).__name__}")
    return SendResult(Outcome.TRANSIENT, f"unexpected error ({type(error).__name__})")


def _result_from_response(response: Any) -> SendResult:
    """Classify an FCM error answer by its FCM error code, then by its HTTP status."""
    status: int = response.status_code
    fcm_code, canonical, message = _parse_error_body(response)
    code = fcm_code or canonical or f"HTTP {status}"
    reason = f"{code} (HTTP {status})"
    if message:
        reason = _truncate(f"{reason}: {message}")
    if fcm_code in DEAD_TOKEN_ERROR_CODES:
        return SendResult(Outcome.INVALID_DEVICE, reason)
    if (
        status >= 500
        or status in TRANSIENT_HTTP_STATUSES
        or fcm_code in TRANSIENT_ERROR_CODES
        or (fcm_code is None and canonical in TRANSIENT_ERROR_CODES)
    ):
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return SendResult(Outcome.TRANSIENT, reason, retry_after)
    return SendResult(Outcome.PERMANENT, reason)


def _parse_error_body(response: Any) -> tuple[str | None, str | None, str]:
    """(FCM error code, canonical status, message) from a Google API error body."""
    try:
        body = response.json()
    except ValueError:
        return None, None, ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None, ""
    fcm_code: str | None = None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_DETAIL_TYPE:
            value = detail.get("errorCode")
            fcm_code = value if isinstance(value, str) else None
            break
    canonical = error.get("status")
    message = error.get("message")
    return (
        fcm_code,
        canonical if isinstance(canonical, str) else None,
        message if isinstance(message, str) else "",
    )




def _truncate(text: str) -> str:
    if len(text) <= MAX_REASON_MESSAGE_CHARS:
        return text
    return text[: MAX_REASON_MESSAGE_CHARS - 1] + "…"
