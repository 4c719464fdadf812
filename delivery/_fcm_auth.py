"""The OAuth2 access token on FCM requests, fetched off the event loop.

google-auth fetches tokens with blocking I/O. firebase-admin's own auth flow does so on
the event loop whenever FCM answers 401 (a revoked or rotated key), with google-auth's
default 120 s timeout and once per refused request: a slow token endpoint would then stall
every push of the loop, APNs included, and a burst of sends would fetch a token each.
Here a token is fetched in a worker thread, with the sender's timeout, and the requests
waiting for it share one fetch and its outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Generator
from typing import Any

import google.auth.exceptions
import httpx

log = logging.getLogger("delivery.fcm")


class AccessTokenError(httpx.RequestError):
    """No access token could be had for a request (the token endpoint refused the
    service account or could not be reached).

    An `httpx.RequestError`, so that firebase-admin reports it per message as it does a
    connection error; `auth_error` is google-auth's exception, which says which it was.
    """

    def __init__(self, auth_error: google.auth.exceptions.GoogleAuthError) -> None:
        super().__init__(f"access token: {type(auth_error).__name__}")
        self.auth_error = auth_error


class AccessToken:
    """A service account's access token, shared by the requests of one event loop.

    Parameters:
      credential: google-auth credentials (firebase-admin's service-account ones).
      auth_request: google-auth transport used to fetch a token, in a worker thread.

    Runs on the sender's event loop; only `credential.refresh` runs on another thread,
    one at a time.
    """

    def __init__(self, credential: Any, auth_request: Any) -> None:
        self._credential = credential
        self._auth_request = auth_request
        self._lock = asyncio.Lock()
        # Fetches finished so far, and how the last one failed (None: it succeeded).
        self._fetched = 0
        self._failure: google.auth.exceptions.GoogleAuthError | None = None

    async def current(self) -> str:
        """A token that is not about to expire, fetched first if there is none.

        Raises google-auth's error when the fetch fails.
        """
        if self._credential.valid:
            return str(self._credential.token)
        return await self._fetch(self._fetched)

    async def replace(self, refused: str) -> str:
        """A token other than `refused`, which FCM has just answered 401 to.

        Raises google-auth's error when the fetch fails.
        """
        seen = self._fetched
        if self._credential.token != refused and self._credential.valid:
            return str(self._credential.token)  # another request has replaced it already
        return await self._fetch(seen)

    async def _fetch(self, seen: int) -> str:
        """Fetch a token unless a fetch finished since the caller looked (`seen` fetches
        had finished then), in which case that fetch's outcome is the caller's too."""
        async with self._lock:
            if self._fetched == seen:
                try:
                    await asyncio.to_thread(self._credential.refresh, self._auth_request)
                except google.auth.exceptions.GoogleAuthError as error:
                    self._failure = error
                    log.warning("fcm access token: %s", type(error).__name__)
                else:
                    self._failure = None
                # Not on cancellation: whoever waits next fetches anew.
                self._fetched += 1
            if self._failure is not None:
                raise self._failure
            return str(self._credential.token)


class AccessTokenAuth(httpx.Auth):
    """httpx auth flow: the current access token on each request; after a 401, one more
    try with a new token.

    Parameters:
      token: the `AccessToken` the requests share.
    """

    def __init__(self, token: AccessToken) -> None:
        self._token = token

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("FCM requests are sent from an event loop only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        try:
            token = await self._token.current()
        except google.auth.exceptions.GoogleAuthError as error:
            raise AccessTokenError(error) from error
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != httpx.codes.UNAUTHORIZED:
            return
        try:
            token = await self._token.replace(token)
        except google.auth.exceptions.GoogleAuthError as error:
            raise AccessTokenError(error) from error
        request.headers["Authorization"] = f"Bearer {token}"
        yield request
