"""The ingest API over HTTP (Starlette, served by uvicorn).

Bearer keys are compared in constant time; bodies are read up to `MAX_BODY_BYTES`;
every refusal is a JSON `{"error", "field"}` with a 4xx; a failure of the database or
the broker is a 503, and no input produces a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ingest.api import HeraldAPI
from ingest.errors import ApiError
from ingest.openapi import openapi_document
from models import db

logger = logging.getLogger("herald.ingest")

# Paths open without a key.
PUBLIC_PATHS = ("/healthz", "/metrics", "/openapi.json", "/v1/unsubscribe/")


def create_app(
    api: HeraldAPI,
    health_checks: list[Callable[[], None]] | None = None,
) -> Starlette:
    """Build the ASGI app.

    Parameters:
      api: the operations.
      health_checks: callables that raise when a dependency (database, broker) is down.
    """
    settings = api.settings
    keys = [k.encode() for k in settings.api_keys]
    checks = health_checks or []

    def authorised(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        supplied = token.strip().encode()
        ok = False
        for key in keys:
            # Compare against every key so timing says nothing about which matched.
            ok |= hmac.compare_digest(supplied, key)
        if scheme.lower() != "bearer" or not supplied or not ok:
            raise ApiError(401, "missing or invalid API key", "Authorization")
        return supplied.decode()

    async def read_json(request: Request) -> tuple[Any, bytes]:
        limit = settings.MAX_BODY_BYTES
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length", "Content-Length")
            if int(declared) > limit:
                raise ApiError(413, f"body larger than {limit} bytes", None)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body larger than {limit} bytes", None)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise ApiError(400, "a JSON body is required", None)
        try:
            return json.loads(raw), raw
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"invalid JSON: {exc}"[:200], None) from None
        except RecursionError:
            raise ApiError(400, "invalid JSON: nested too deeply", None) from None

    def endpoint(handler: Callable[..., Any], *, auth: bool = True) -> Callable[..., Any]:
        async def wrapped(request: Request) -> Response:
            try:
                key = authorised(request) if auth else ""
                return await handler(request, key)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Exception:
                logger.exception("request failed: %s %s", request.method, request.url.path)
                return JSONResponse(
                    {"error": "service unavailable, retry later", "field": None},
                    status_code=503,
                )

        return wrapped

    def in_db(fn: Callable[..., Any], *args: Any) -> Any:
        with db.connection_context():
            return fn(*args)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(in_db, fn, *args)

    # Handlers ------------------------------------------------------------------------

    async def healthz(request: Request, _key: str) -> Response:
        problems = []
        for check in checks:
            try:
                await run_in_threadpool(check)
            except Exception as exc:
                problems.append(f"{getattr(check, '__name__', 'check')}: {type(exc).__name__}")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request, _key: str) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request, _key: str) -> Response:
        return JSONResponse(openapi_document())

    async def user(request: Request, _key: str) -> Response:
        user_id = request.path_params["user_id"]
        if request.method == "PUT":
            body, _ = await read_json(request)
            return JSONResponse(await call(api.upsert_user, user_id, body))
        return JSONResponse(await call(api.get_user, user_id))

    async def devices(request: Request, _key: str) -> Response:
        user_id = request.path_params["user_id"]
        if request.method == "GET":
            return JSONResponse(await call(api.list_devices, user_id))
        body, _ = await read_json(request)
        if request.method == "POST":
            status, device = await call(api.add_device, user_id, body)
            return JSONResponse(device, status_code=status)
        await call(api.remove_device, user_id, body)
        return Response(status_code=204)

    async def events(request: Request, key: str) -> Response:
        body, raw = await read_json(request)
        idem = request.headers.get("idempotency-key")

        def run() -> tuple[int, dict[str, Any]]:
            return 202, api.submit_events(body)

        status, answer = await call(api.idempotent, key, idem, raw, run)
        return JSONResponse(answer, status_code=status)

    async def pending(request: Request, _key: str) -> Response:
        return JSONResponse(await call(api.pending, request.path_params["user_id"]))

    async def unsubscribe(request: Request, _key: str) -> Response:
        token = request.path_params["token"]
        if request.method == "POST":
            # RFC 8058 one-click: the mail client POSTs "List-Unsubscribe=One-Click".
            await call(api.unsubscribe, token)
            return HTMLResponse(_UNSUBSCRIBED_PAGE)
        return HTMLResponse(_CONFIRM_PAGE)

    routes = [
        Route("/healthz", endpoint(healthz, auth=False), methods=["GET"]),
        Route("/metrics", endpoint(metrics, auth=False), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi, auth=False), methods=["GET"]),
        Route("/v1/users/{user_id}", endpoint(user), methods=["GET", "PUT"]),
        Route("/v1/users/{user_id}/devices", endpoint(devices),
              methods=["GET", "POST", "DELETE"]),
        Route("/v1/users/{user_id}/pending", endpoint(pending), methods=["GET"]),
        Route("/v1/events", endpoint(events), methods=["POST"]),
        Route("/v1/unsubscribe/{token}", endpoint(unsubscribe, auth=False),
              methods=["GET", "POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "no such endpoint", "field": None}, status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        # RFC 9110: a 405 lists the methods the resource does allow.
        headers = getattr(exc, "headers", None) or {}
        return JSONResponse({"error": "method not allowed", "field": None}, status_code=405,
                            headers={k: v for k, v in headers.items() if k.lower() == "allow"})

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


_CONFIRM_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<title>Unsubscribe</title></head><body>
<p>Stop emails about missed messages?</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form></body></html>"""

_UNSUBSCRIBED_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<title>Unsubscribed</title></head><body>
<p>You will no longer get emails about missed messages.</p></body></html>"""
