"""Drives the official google-genai SDK against the proxy (see tests/python_sdk.rs).

Usage: sdk_client.py BASE_URL MODE [AGENT]

MODE is how the agent is named:
  path    the agent is already in BASE_URL (e.g. http://127.0.0.1:1234/agents/sage);
  header  BASE_URL is the bare proxy and the SDK sends `x-agent-id: AGENT`.

Runs one `generate_content` and one `generate_content_stream` (every chunk read),
then prints one JSON line on stdout:
  {"sdk_version": "...", "generate": {"text": ..., "total_token_count": N},
   "stream": {"text": ..., "chunks": N, "total_token_count": N}}
where total_token_count is the last `usage_metadata.total_token_count` the SDK saw.
Any error makes the script exit non-zero with the traceback on stderr.
"""

import json
import sys

from google import genai
from google.genai import types

MODEL = "gemini-2.5-flash"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[2] not in ("path", "header"):
        print(__doc__, file=sys.stderr)
        return 2
    base_url, mode = argv[1], argv[2]
    agent = argv[3] if len(argv) == 4 else "sage"

    headers = {"x-agent-id": agent} if mode == "header" else None
    client = genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(
            base_url=base_url,
            headers=headers,
            timeout=30_000,  # milliseconds
        ),
    )

    response = client.models.generate_content(model=MODEL, contents="Hello")
    generate = {
        "text": response.text,
        "total_token_count": (
            response.usage_metadata.total_token_count
            if response.usage_metadata
            else None
        ),
    }

    texts = []
    chunks = 0
    stream_total = None
    for chunk in client.models.generate_content_stream(model=MODEL, contents="Hello"):
        chunks += 1
        if chunk.text:
            texts.append(chunk.text)
        if chunk.usage_metadata and chunk.usage_metadata.total_token_count is not None:
            stream_total = chunk.usage_metadata.total_token_count
    stream = {"text": "".join(texts), "chunks": chunks, "total_token_count": stream_total}

    client.close()
    print(
        json.dumps(
            {"sdk_version": genai.__version__, "generate": generate, "stream": stream},
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
