"""Drives the gateway with the official OpenAI Python SDK, as Kilo Code,
Cline and scripts do, and prints what it saw as JSON for tests/it/openai_sdk.rs.

Usage: python tests/openai_sdk_client.py BASE_URL [limited KEY]
  (default) a tour: chat, stream, model list, a refused request;
  limited KEY: requests with a gateway key until the gateway refuses one
  with 429, and prints how the SDK saw it.
"""
import json
import sys

import openai


def limited(base_url: str, key: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    served = 0
    for _ in range(100):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi."}])
            served += 1
        except openai.RateLimitError as e:
            body = e.body if isinstance(e.body, dict) else {}
            print(json.dumps({
                "served": served,
                "error_class": type(e).__name__,
                "status": e.status_code,
                "code": e.code,
                "type": body.get("type"),
                "retry_after": e.response.headers.get("retry-after"),
                "limit_requests": e.response.headers.get("x-ratelimit-limit-requests"),
            }))
            return
    print(json.dumps({"served": served, "error_class": None}))


def main() -> None:
    base_url = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "limited":
        limited(base_url, sys.argv[3])
        return
    # The client's own key is never forwarded; any value must work.
    client = openai.OpenAI(base_url=base_url, api_key="sk-client-ignored", max_retries=0, timeout=30)
    out = {"sdk_version": openai.__version__}

    chat = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi."}],
        extra_headers={"HTTP-Referer": "https://kilocode.ai", "X-Title": "Kilo Code"},
    )
    out["chat"] = {"content": chat.choices[0].message.content, "model": chat.model,
                   "total_tokens": chat.usage.total_tokens}

    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.total_tokens
    out["stream"] = {"content": "".join(deltas), "chunks": len(deltas), "total_tokens": usage}

    models = client.models.list()
    out["models"] = [{"id": m.id, "context_window": (m.model_extra or {}).get("context_window")}
                     for m in models.data]

    # A model name the gateway refuses: the SDK must map the gateway's own
    # error JSON to its exception, with code and message.
    try:
        client.chat.completions.create(model="bad\nmodel", messages=[{"role": "user", "content": "Hi."}])
        out["refused"] = None
    except openai.BadRequestError as e:
        out["refused"] = {"status": e.status_code, "code": e.code, "message": e.message}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
