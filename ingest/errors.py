"""The one error type of the ingest API: an HTTP status and a JSON body naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class ApiError(Exception):
    """A request herald refuses; becomes `{"error": ..., "field": ...}` with `status`.

    Parameters:
      status: 400, 401, 404, 409, 413, 422 or 503.
      error: what is wrong, for a person.
      field: the offending field's path (e.g. ``events[3].message.topic``), if any.
    """

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field}


def from_validation(
    exc: ValidationError, prefix: str = "", status: int = 422, tag: str | None = None
) -> ApiError:
    """The first pydantic error as an ApiError naming its field.

    `tag` is the discriminator value of a tagged union, which pydantic puts first in
    the error path (``message.message.id``); it is dropped from the field name.
    """
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    if tag is not None and loc and loc[0] == tag:
        loc = loc[1:]
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier():
        # Model-level rules say "field: reason".
        loc, message = [*loc, head], rest
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        loc = [*loc, "type"]
    field = ".".join(loc)
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    return ApiError(status, message, field or None)
