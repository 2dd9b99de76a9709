"""POST /v1/chat/completions: the tokenizer's chat template (or a plain fallback), then the same
engine path as completions."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adasd_core.errors import AdasdError, InvalidRequestError
from server.engine_client import Failed, Finished, RequestGroup, SubRequest, TokenDelta
from server.errors import InternalError, UnsupportedError
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    random_id,
)
from server.serving import (
    SSE_DONE,
    OpenAIServing,
    cancel_on_disconnect,
    collect_sources,
    log,
    make_usage,
    source_accumulators,
    sse,
    sse_error,
)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        alias_method = self.check_model(request.model)
        self.check_unsupported(request)
        if request.tools:
            raise UnsupportedError("tools", "tools (function calling) are not supported by this server: omit them")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise UnsupportedError("response_format", 'only response_format {"type": "text"} is supported')
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        self.check_ready()
        spec = self.spec_config(request.adasd, alias_method)

        ids = await self.tokenizer.encode_chat(_messages(request))
        max_tokens = request.max_completion_tokens or request.max_tokens
        max_tokens = self.check_prompt(ids, max_tokens, param="messages")
        top = (request.top_logprobs or 0) if request.logprobs else None
        subs = [SubRequest(ids, self.sampling_params(request, max_tokens, top, j), spec) for j in range(request.n)]

        group = self.client.submit(subs, spec.method, self.fingerprint_key(spec, subs[0].params))
        rid, created = random_id("chatcmpl"), int(time.time())
        if request.stream:
            stream = self._stream(request, group, rid, created, len(ids))
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response = await cancel_on_disconnect(raw_request, self._collect(request, group, rid, created, len(ids)))
        if response is None:
            return Response(status_code=499)
        return JSONResponse(response.model_dump())

    async def _collect(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                       prompt_tokens: int) -> ChatCompletionResponse:
        texts: list[list[str]] = [[] for _ in range(group.size)]
        finish: list[str | None] = [None] * group.size
        stats: list[dict | None] = [None] * group.size
        logprobs = [ChatLogprobs(content=[]) if request.logprobs else None for _ in range(group.size)]
        sources = source_accumulators(request, group.size)
        try:
            async for index, out in group:
                if isinstance(out, TokenDelta):
                    texts[index].append(out.text)
                    if logprobs[index] is not None and out.logprobs:
                        logprobs[index].content.extend(_chat_logprobs(out.logprobs))
                    collect_sources(sources[index], out.adasd)
                    finish[index] = out.finish_reason or finish[index]
                elif isinstance(out, Finished):
                    stats[index] = out.stats
                elif isinstance(out, Failed):
                    raise out.error
        finally:
            group.abort()
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content="".join(texts[i])), logprobs=logprobs[i],
                              finish_reason=finish[i], adasd=sources[i]) for i in range(group.size)]
        return ChatCompletionResponse(id=rid, created=created, model=self.model_name,
                                      system_fingerprint=group.fingerprint, choices=choices,
                                      usage=make_usage(prompt_tokens, stats))

    async def _stream(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                      prompt_tokens: int) -> AsyncIterator[str]:
        def chunk(choices: list[dict], **extra) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "system_fingerprint": group.fingerprint, "choices": choices, **extra})

        def choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None,
                   adasd: dict | None = None) -> dict:
            lp = {"content": [x.model_dump() for x in _chat_logprobs(logprobs)]} if logprobs else None
            out = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            if adasd:
                out["adasd"] = adasd
            return out

        stats: list[dict | None] = [None] * group.size
        try:
            for i in range(group.size):
                yield chunk([choice(i, {"role": "assistant", "content": ""})])
            async for index, out in group:
                if isinstance(out, TokenDelta):
                    if out.text or (request.logprobs and out.logprobs) or out.adasd:
                        yield chunk([choice(index, {"content": out.text}, logprobs=out.logprobs if request.logprobs else None,
                                            adasd=out.adasd)])
                    if out.finish_reason:
                        yield chunk([choice(index, {}, out.finish_reason)])
                elif isinstance(out, Finished):
                    stats[index] = out.stats
                elif isinstance(out, Failed):
                    raise out.error
            if request.include_usage:
                yield chunk([], usage=make_usage(prompt_tokens, stats).model_dump())
        except AdasdError as exc:  # after the first chunk, errors travel inside the stream
            yield sse_error(exc)
        except Exception:
            log.exception("chat stream failed")
            yield sse_error(InternalError())
        finally:
            group.abort()
        yield SSE_DONE


def _messages(request: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(request.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise UnsupportedError(f"messages.{i}.content",
                                           f"only text content parts are supported (got type {part.type!r})")
                parts.append(part.text)
            content = "".join(parts)
        out.append({"role": m.role, "content": content or ""})
    return out


def _chat_logprobs(entries: list) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()),
                         top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in top])
        for token, logprob, top in entries
    ]
