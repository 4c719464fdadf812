"""The ingest API keeps the word of its OpenAPI document, checked with generated
requests (schemathesis) against a real herald process.

For every operation, schemathesis sends requests drawn from the document (valid ones
and deliberately broken ones) and checks what a client relies on: never a 5xx, only
status codes the document declares, bodies shaped as it says, a request it calls
valid accepted, one it calls invalid refused, and a 405 that lists the allowed
methods. Generation is derandomised so that a failure here repeats run after run.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from ingest.openapi import openapi_document
from models import SQLITE_BUSY_TIMEOUT_MS
from tests.harness import HeraldProcess

pytestmark = pytest.mark.slow

# Requests per operation and phase; enough to reach each schema's corners.
EXAMPLES_PER_OPERATION = 60
# How long a request may take. A request that writes may queue behind the worker's
# writes to the SQLite file, up to the 30 s busy timeout, past which herald answers a
# documented 503; a client timeout below that would fail on a busy machine.
REQUEST_TIMEOUT_SECONDS = SQLITE_BUSY_TIMEOUT_MS / 1000 + 15

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    directory: Path = tmp_path_factory.mktemp("contract")
    env = {"DATABASE_URL": f"sqlite:///{directory / 'herald.db'}",
           "OUTBOX_DIR": str(directory / "outbox")}
    with HeraldProcess(env, "all", cwd=directory) as process:
        yield process
        # Nothing it was sent made it stop or log a failure.
        assert process.proc is not None and process.proc.poll() is None
        assert "Traceback" not in process.output()


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case: schemathesis.Case,
                                               herald: HeraldProcess) -> None:
    if case.headers and "Idempotency-Key" in case.headers:
        # A generated key may repeat with another body, which is refused by design
        # (422); each request gets a key of its own.
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    if case.path == "/v1/events":
        # An event for a user herald does not know is refused (422) by contract, which
        # no schema can say: register the users a request names first.
        _register(herald, _user_ids(case.body))
    case.call_and_validate(base_url=herald.url, timeout=REQUEST_TIMEOUT_SECONDS,
                           headers={"Authorization": "Bearer test-key"})


def _user_ids(body: Any) -> set[int]:
    events = body.get("events") if isinstance(body, dict) and "events" in body else [body]
    if not isinstance(events, list):
        return set()
    return {e["user_id"] for e in events if isinstance(e, dict)
            and type(e.get("user_id")) in (int, float) and 1 <= e["user_id"] < 2**63
            and float(e["user_id"]).is_integer()}


def _register(herald: HeraldProcess, user_ids: set[int]) -> None:
    with herald.client() as client:
        for user_id in user_ids:
            response = client.put(f"/v1/users/{int(user_id)}", json={
                "email": f"user{int(user_id)}@example.com", "full_name": "Contract"})
            assert response.status_code == 200, response.text


# Operations that answer without the database or the broker.
_NO_BACKEND = {("/metrics", "get"), ("/v1/unsubscribe/{token}", "get")}


def test_every_operation_declares_the_failures_it_can_answer_with() -> None:
    # Each operation that reaches the database or the broker can answer 503 when they
    # are down, and each that reads a body, 413 when it is over the limit.
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            codes = operation["responses"]
            if (path, method) not in _NO_BACKEND:
                assert "503" in codes, (method, path)
            if "requestBody" in operation:
                assert "413" in codes, (method, path)


def test_every_string_of_a_body_is_documented_without_nul() -> None:
    def strings(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "string" and not {"enum", "const"} & node.keys():
                yield node
            for key, value in node.items():
                if key != "then":  # a rule's restatement of a field's type
                    yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    schemas = openapi_document()["components"]["schemas"]
    found = list(strings([s for name, s in schemas.items() if name != "Error"]))
    assert len(found) > 10
    for string in found:
        assert "pattern" in string, string
        assert not re.search(string["pattern"], "a\x00b"), string
