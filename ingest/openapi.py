"""The OpenAPI 3.1 description of the ingest API, built from the pydantic models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from events import (
    NO_NUL_PATTERN,
    DeviceIn,
    DeviceRef,
    MessageDeletedEvent,
    MessageEvent,
    ReadEvent,
    UserSettingsIn,
)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown",
             409: "Idempotency-Key in progress", 413: "Body too large",
             422: "Invalid content", 503: "Database or broker unavailable"}
    return {str(c): _answer(names[c], _ERROR) for c in codes}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


class _HeraldJsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, saying of every string what the models check of it: no
    U+0000 (`events._Strict`). A string with a pattern of its own keeps it; each of
    those leaves NUL out already."""

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        out = super().str_schema(schema)
        out.setdefault("pattern", NO_NUL_PATTERN)
        return out


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (MessageEvent, ReadEvent, MessageDeletedEvent,
                                     UserSettingsIn, DeviceIn, DeviceRef)],
        ref_template="#/components/schemas/{model}",
        schema_generator=_HeraldJsonSchema,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
        "required": ["error", "field"],
    }
    event = {"oneOf": [{"$ref": f"#/components/schemas/{n}"}
                       for n in ("MessageEvent", "ReadEvent", "MessageDeletedEvent")],
             "discriminator": {"propertyName": "type"}}
    schemas["Event"] = event
    user_id = {"name": "user_id", "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "herald ingest API", "version": "1"},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"security": [], "responses": {
                "200": _answer("Database and broker reachable"), **_errors(503)}}},
            "/metrics": {"get": {"security": [], "responses": {
                "200": _answer("Prometheus text format")}}},
            "/v1/users/{user_id}": {
                "parameters": [user_id],
                "put": {"requestBody": _body("#/components/schemas/UserSettingsIn"),
                        "responses": {"200": _answer("The stored user"),
                                      **_errors(400, 401, 413, 422, 503)}},
                "get": {"responses": {"200": _answer("The user"),
                                      **_errors(400, 401, 404, 503)}},
            },
            "/v1/users/{user_id}/devices": {
                "parameters": [user_id],
                "post": {"requestBody": _body("#/components/schemas/DeviceIn"),
                         "responses": {"201": _answer("Registered"),
                                       "200": _answer("Already registered"),
                                       **_errors(400, 401, 404, 413, 422, 503)}},
                "get": {"responses": {"200": _answer("The user's devices"),
                                      **_errors(400, 401, 404, 503)}},
                "delete": {"requestBody": _body("#/components/schemas/DeviceRef"),
                           "responses": {"204": _answer("Removed"),
                                         **_errors(400, 401, 404, 413, 422, 503)}},
            },
            "/v1/users/{user_id}/pending": {
                "parameters": [user_id],
                "get": {"responses": {"200": _answer("Messages waiting in the email batch"),
                                      **_errors(400, 401, 404, 503)}},
            },
            "/v1/events": {"post": {
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "maxLength": 255}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [{"$ref": "#/components/schemas/Event"},
                              {"type": "object", "properties": {"events": {
                                  "type": "array", "minItems": 1, "items": {
                                      "$ref": "#/components/schemas/Event"}}},
                               "required": ["events"], "additionalProperties": False}]}}}},
                "responses": {"202": _answer("Queued", {"type": "object", "properties": {
                    "accepted": {"type": "integer"}}}),
                    **_errors(400, 401, 409, 413, 422, 503)}}},
            "/v1/unsubscribe/{token}": {
                "parameters": [{"name": "token", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "get": {"security": [], "responses": {"200": _answer("Confirmation page")}},
                "post": {"security": [], "responses": {"200": _answer("Unsubscribed"),
                                                       **_errors(404, 503)}},
            },
        },
    }
