"""Several live streams in one OpenAI chat request: each ``stream://<id>`` part is asked at once, as a text fleet
question (:mod:`serve.core.fleet`), and answers as one choice of the completion.

Choice ``i`` is the answer of the ``i``-th stream named in the message and says which (``stream_id``, an extra field
next to OpenAI's own); a stream that failed answers with empty content and an ``error`` field. Usage sums every
stream's exact counts. Streamed (``stream: true``), each stream's answer arrives as one chunk (``choices[0].index``
is its choice) as soon as that stream finished, then a chunk with ``choices: []`` and the usage, then ``[DONE]``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from serve.core.fleet import FleetAnswer, FleetQuestion


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to its earliest stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _choice(index: int, answer: FleetAnswer, stops: list[str], limit: int, key: str) -> dict[str, Any]:
    text, stopped = _cut(answer.answer or "", stops)
    reason = "length" if not stopped and (answer.completion_tokens or 0) >= limit else "stop"
    choice: dict[str, Any] = {"index": index, key: {"role": "assistant", "content": text}, "finish_reason": reason,
                              "stream_id": answer.stream_id}
    if answer.error is not None:
        choice["error"] = {"message": answer.error.message, "type": answer.error.type, "code": answer.status}
    return choice


def _usage(answers: list[FleetAnswer]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens or 0 for a in answers)
    completion = sum(a.completion_tokens or 0 for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def complete_fleet(backend: Any, model: str, stream: bool, question: str, urls: list[str], stops: list[str],
                         limit: int) -> Any:
    """The completion over every named stream (their questions go to the LLM together)."""
    request = FleetQuestion(question=question, streams=[u[len("stream://"):] for u in urls], mode="text",
                            max_new_tokens=limit)
    ids = await backend.targets(request)  # 413 past serve.fleet.max_streams
    index = {sid: i for i, sid in enumerate(ids)}
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
    if stream:
        return StreamingResponse(_chunks(backend, ids, request, index, stops, limit, meta),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    answers = [a async for a in backend.fleet(ids, request)]
    choices = sorted((_choice(index[a.stream_id], a, stops, limit, "message") for a in answers),
                     key=lambda c: c["index"])
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(answers)}


async def _chunks(backend: Any, ids: list[str], request: FleetQuestion, index: dict[str, int], stops: list[str],
                  limit: int, meta: dict[str, Any]) -> AsyncIterator[bytes]:
    answers = []
    async for answer in backend.fleet(ids, request):
        answers.append(answer)
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [_choice(index[answer.stream_id], answer, stops, limit, "delta")]}
        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
    body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(answers)}
    yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
