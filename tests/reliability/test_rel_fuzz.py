"""Fuzzing: schemathesis against the server's own /openapi.json, every operation, bounded examples.

Checks: no response >= 500, our responses conform to the schemas we declare, and no error body
carries a stack trace. ADASD_REL_FUZZ_EXAMPLES sets the examples per operation (CI default 25).
The long form is `python -m scripts.reliability.fuzz` (schemathesis CLI, time-bounded).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from scripts.reliability.faults import TRACE_MARKERS

MAX_EXAMPLES = int(os.environ.get("ADASD_REL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="session")
def fuzz_server(rel_start):
    # no artificial round delay: fuzzed generations (any max_tokens up to the context) stay quick
    return rel_start(round_delay_s=0, max_running=4)


@pytest.fixture(scope="session")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_operations(case, fuzz_server):
    response = case.call(base_url=fuzz_server.base_url, headers=fuzz_server.headers, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    if response.status_code >= 400:
        assert not any(m in response.text for m in TRACE_MARKERS), response.text


# Found by this fuzzer: a top_p below float32's smallest subnormal became 0.0, every token was
# dropped and the NaN probabilities made the worker raise (a 500). Fixed in adasd_core.sampling.
@pytest.mark.parametrize("path,payload", [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
])
def test_denormal_top_p_is_not_a_server_error(fuzz_server, path, payload):
    import httpx

    r = httpx.post(fuzz_server.base_url + path, headers=fuzz_server.headers, timeout=60,
                   json={"model": fuzz_server.model, "max_tokens": 4, "top_p": 5e-324, "temperature": 1.0, **payload})
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("field,value", [
    # also found here: logits / 1e-320 overflowed to inf (a 500); such temperatures are greedy now
    ("temperature", 1e-320),
    ("temperature", 1e308), ("top_p", 1e-30)])
def test_extreme_sampling_values_are_not_server_errors(fuzz_server, field, value):
    import httpx

    r = httpx.post(fuzz_server.base_url + "/v1/completions", headers=fuzz_server.headers, timeout=60,
                   json={"model": fuzz_server.model, "prompt": "x", "max_tokens": 4, field: value})
    assert r.status_code < 500, r.text
