"""schemathesis against the server's own OpenAPI schema: no 5xx, and every response (status, content
type, headers, body) as the schema documents it, for valid (positive) and invalid (negative) inputs.
A bounded number of examples per operation keeps CI fast.

The cases are drawn with `operation.as_strategy()` under plain hypothesis, not schemathesis's pytest
plugin (its lazy fixture loader does not run under pytest 9).
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

MAX_EXAMPLES = 25
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
              ("DELETE", "/v1/responses/{response_id}"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
              ("GET", "/v1/attestation"), ("GET", "/health"), ("GET", "/metrics"),
              ("GET", "/webhooks/whatsapp"), ("POST", "/webhooks/whatsapp")]


@pytest.fixture(scope="module")
def api_schema(schema_server):
    schema = schemathesis.openapi.from_url(schema_server.url + "/openapi.json")
    # a negative body can outgrow the server's (tight, below) body limit: 413 is a rejection too
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


@pytest.fixture(scope="module")
def schema_server(live, tiny_chat):
    """The full app (tenants, webhook, attestation) over the tiny model; tight limits keep examples fast."""
    from isthmus.interop.app import Limits, create_app
    from isthmus.interop.tenants import Tenants, hash_key
    from isthmus.interop.webhook import WhatsAppAdapter, WhatsAppConfig

    class NoPlatform:
        async def send_text(self, *a):
            pass

        async def aclose(self):
            pass

    class Attestation:
        def report(self, nonce):
            import json
            return json.dumps({"body": {"nonce": nonce.hex()}, "signature": "00", "certificates": []}).encode()

    key = "sk-schema-0123456789"
    tenants = Tenants.from_config({"tenants": [{"id": "t", "api_key_sha256": [hash_key(key)]}]})
    wa = WhatsAppAdapter(WhatsAppConfig(verify_token="v", app_secret="s", phone_numbers={"1": "t"}),
                         outbound=NoPlatform())
    app = create_app({"tiny-chat": tiny_chat.engine(max_batch=8, max_waiting=8)}, tenants=tenants,
                     limits=Limits(32 << 10), attestation=Attestation(), whatsapp=wa)
    s = live.start(app)
    s.key = key
    return s


CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if not (mode == GenerationMode.NEGATIVE and p in ("/health", "/metrics"))]   # nothing there to negate
# Every check but positive_data_acceptance: a schema-valid request may still be refused with 400 for
# what a schema cannot say (the prompt plus max_tokens over the model's context window).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_operation_conforms_to_the_schema(api_schema, schema_server, method, path, mode):
    operation = api_schema[path][method]
    headers = {} if path.startswith("/webhooks") else {"Authorization": f"Bearer {schema_server.key}"}
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        r = case.call_and_validate(base_url=schema_server.url, headers=headers, timeout=60, checks=CHECKS)
        seen.append(r.status_code)

    run()
    assert seen and max(seen) < 500
