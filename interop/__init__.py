"""Serving: the OpenAI-compatible Chat Completions API and a messaging-platform webhook.

    app.py         create_app(): routes, auth, limits (413), errors in OpenAI's shape, metrics
    openai_api.py  request/response schemas and the chat completion handler (JSON and SSE)
    tenants.py     API keys (hashed), model allow-lists, token-bucket rate limits
    webhook.py     /webhooks/whatsapp: handshake, signed notifications, de-duplication, replies, erasure
    outbox.py      the webhook's SQLite state: durable outbox with retries, de-duplication window, E2E pins
    envelope.py    end-to-end encrypted message envelopes to the (attested) enclave key, sender-authenticated
    metrics.py     Prometheus text exposition
    cli.py         `isthmus serve`

The Engine that serves (continuous batching) is runtime/engine.py; interop holds only HTTP.
See docs/api.md (the API) and docs/serving.md (scheduling, limits, measured figures).
"""
