"""The official openai SDK against an OpenAI-compatible base URL (argv[1], e.g.
http://127.0.0.1:PORT/v1): one completion and one stream with usage, checked
against the test upstream's echo reply. Prints one JSON line; exits non-zero
on any mismatch."""

import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "hello from the sdk"}]
done = client.chat.completions.create(model="patient-test", messages=messages)
assert done.choices[0].message.content == "echo: hello from the sdk", done
assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 5, done.usage
pieces, usage = [], None
stream = client.chat.completions.create(
    model="patient-test", messages=messages, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    pieces += [c.delta.content for c in chunk.choices if c.delta.content]
assert "".join(pieces) == "echo: hello from the sdk", pieces
assert usage is not None and usage.total_tokens == 9, usage
print(json.dumps({"openai": openai.__version__, "completion": done.id, "chunks": len(pieces)}))
