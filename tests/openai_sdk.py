"""Drives a running Switchyard with the official OpenAI Python SDK (argv[1] = base URL)."""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-used-by-switchyard", max_retries=0)

raw = client.chat.completions.with_raw_response.create(
    model="auto", messages=[{"role": "user", "content": "Summarise: the launch moved to May."}]
)
reply = raw.parse()
assert raw.headers["x-switchyard-tier"] == "sim-small", raw.headers
assert reply.choices[0].message.content, reply
assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0, reply.usage

text = ""
for chunk in client.chat.completions.create(
    model="auto", stream=True, messages=[{"role": "user", "content": "Tell me a story"}]
):
    assert chunk.choices, "the router hides the usage chunk it asked for"
    text += chunk.choices[0].delta.content or ""
assert text.startswith("sim-"), text

usage_seen = False
for chunk in client.chat.completions.create(
    model="auto", stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "hi"}],
):
    usage_seen |= chunk.usage is not None
assert usage_seen, "a caller that asks for usage gets it"

emb = client.embeddings.create(model="sim-small-model", input=["a", "b"])
assert len(emb.data) == 2

models = [m.id for m in client.models.list()]
assert "auto" in models and "sim-large-model" in models, models
assert client.models.retrieve("sim-large-model").id == "sim-large-model"
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was found")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model must fail")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

try:
    for _ in client.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-sim-fault": "reset-after-head"},
    ):
        pass
    raise AssertionError("a broken stream must raise")
except openai.APIError as e:
    assert "upstream stream failed" in str(e), e

print("openai sdk: all checks passed")
