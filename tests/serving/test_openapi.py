"""The OpenAPI document tells the truth: schemathesis generates requests from `prism serve`'s /openapi.json and
checks every answer against it (status codes, content types, headers, bodies), bounded in examples and time,
against a live tiny server."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from helpers import LiveServer, upstream_at
from prism.inference.router import Router
from prism.inference.transformers import PrismModel
from prism.serving.config import ServeConfig
from prism.serving.server import create_app
from prism.serving.sidecar import create_sidecar_app

KEY = "schema-key"
EXAMPLES = 40  # per operation and mode: about 170 requests in all, seconds on the tiny model
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, unsupported_method, allow_header_conformance]


@pytest.fixture(scope="module")
def live(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=64)
    server = LiveServer(create_app(model, api_key=KEY, default_max_tokens=4, max_batch_size=4)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(live, tiny_run):
    """The routing sidecar in front of the live server (its upstream)."""
    router = Router.from_run(tiny_run, device="cpu")
    server = LiveServer(create_sidecar_app(router, upstream_at(live.url + "/v1"), ServeConfig(api_key=KEY))).start()
    yield server
    server.stop()


def documented_operations(server: LiveServer) -> list:
    """Every operation the server's /openapi.json documents, as schemathesis reads it."""
    return [result.ok() for result in schemathesis.openapi.from_url(server.url + "/openapi.json").get_all_operations()]


@pytest.fixture(scope="module")
def operations(live):
    return documented_operations(live)


@pytest.mark.parametrize(("mode", "key"), [(GenerationMode.POSITIVE, KEY), (GenerationMode.NEGATIVE, KEY),
                                           (GenerationMode.POSITIVE, None)])  # no key: every guarded answer is a 401
def test_the_server_answers_as_its_openapi_document_says(operations, mode, key):
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/route", "/v1/models", "/metrics",
                                                "/health", "/admin/reload"}
    calls: dict[str, int] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not takes_input(operation):
            continue  # nothing to send it that its schema rejects

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_as_documented(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"} if key else {}, checks=CHECKS, timeout=60)
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1

        answers_as_documented()
    expected = {op.label for op in operations if mode is GenerationMode.POSITIVE or takes_input(op)}
    assert set(calls) == expected and min(calls.values()) >= 1, calls


def takes_input(operation) -> bool:
    return bool(len(operation.body) or len(operation.query) or len(operation.path_parameters))


def test_a_method_the_document_does_not_list_is_a_405_that_names_the_allowed_ones(live, operations):
    import httpx2

    documented: dict[str, set[str]] = {}
    for operation in operations:
        documented.setdefault(operation.path, set()).add(operation.method.upper())
    for path, methods in documented.items():
        for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - methods):
            answer = httpx2.request(method, live.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert answer.status_code == 405, (method, path)
            assert set(answer.headers["allow"].replace(" ", "").split(",")) == methods, (method, path)
            assert answer.json()["error"]["message"] == "Method Not Allowed"


def test_the_sidecar_answers_as_its_openapi_document_says(sidecar):
    operations = documented_operations(sidecar)
    chat = next(op for op in operations if op.path == "/v1/chat/completions")
    assert chat.body, "the sidecar documents the chat request it validates by hand"
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES // 2, deadline=None, phases=[Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_as_documented(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=60)

        answers_as_documented()
