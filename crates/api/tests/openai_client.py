"""Drives a running `hypertensor api` with the official `openai` Python package.

Usage: python3 openai_client.py http://127.0.0.1:PORT

Checks, with temperature 0: a chat completion and the same one streamed are
non-empty and equal; models are listed; an unknown model raises
openai.NotFoundError and a bad temperature openai.BadRequestError; a legacy
completion answers. Prints one JSON line with the answer last, exits non-zero
on any failure.
"""

import json
import sys

import openai


def main() -> None:
    url = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=300)

    ids = [m.id for m in client.models.list().data]
    assert ids, "no models listed"
    model = ids[0]
    assert client.models.retrieve(model).id == model

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=24
    )
    answer = whole.choices[0].message.content
    assert answer and answer.strip(), f"empty answer: {whole}"
    assert whole.choices[0].finish_reason in ("stop", "length"), whole
    assert whole.usage.completion_tokens > 0, whole.usage

    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert streamed == answer, f"streamed {streamed!r} != whole {answer!r}"
    assert len(pieces) > 1, f"the answer came in one piece: {pieces}"
    assert finish == whole.choices[0].finish_reason, (finish, whole)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    else:
        raise AssertionError("an unknown model did not raise NotFoundError")

    try:
        client.chat.completions.create(model=model, messages=messages, temperature=7)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    else:
        raise AssertionError("temperature 7 did not raise BadRequestError")

    legacy = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert legacy.choices[0].text, legacy

    print(json.dumps({"model": model, "pieces": len(pieces), "answer": answer}))


if __name__ == "__main__":
    main()
