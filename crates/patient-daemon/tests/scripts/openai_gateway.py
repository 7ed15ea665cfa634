"""The official openai SDK through the gateway, unchanged but for base_url
(argv[1], e.g. http://127.0.0.1:PORT/openai/v1): a completion, a stream with
usage, a stream the upstream cuts (the SDK must raise, not end quietly), and
an error the gateway answers itself (413). Prints one JSON line; exits
non-zero on any mismatch."""

import json
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "hello through the gateway"}]

done = client.chat.completions.create(model="patient-test", messages=messages)
assert done.choices[0].message.content == "echo: hello through the gateway", done
assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 5, done.usage

pieces, usage = [], None
stream = client.chat.completions.create(
    model="patient-test",
    messages=messages,
    stream=True,
    stream_options={"include_usage": True},
    extra_query={"split": "1", "pings": "2", "interval_ms": "5"},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    pieces += [c.delta.content for c in chunk.choices if c.delta.content]
assert "".join(pieces) == "echo: hello through the gateway", pieces
assert usage is not None and usage.total_tokens == 9, usage

cut_error = None
got = []
try:
    for chunk in client.chat.completions.create(
        model="patient-test", messages=messages, stream=True, extra_query={"cut_after": "2"}
    ):
        got += [c.delta.content for c in chunk.choices if c.delta.content]
except openai.APIError as e:
    cut_error = str(e)
assert cut_error is not None and "[DONE]" in cut_error, (cut_error, got)
assert len(got) == 2, got

too_large = None
try:
    client.chat.completions.create(model="patient-test", messages=[{"role": "user", "content": "x" * 5000}])
except openai.APIStatusError as e:
    too_large = (e.status_code, e.body)
assert too_large is not None and too_large[0] == 413, too_large
assert too_large[1]["type"] == "payload_too_large", too_large

models = client.models.list()
assert [m.id for m in models.data] == ["patient-test"], models

print(json.dumps({"openai": openai.__version__, "chunks": len(pieces), "cut": cut_error}))
