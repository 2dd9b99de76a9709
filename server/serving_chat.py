"""POST /v1/chat/completions: the tokenizer's chat template (or a plain fallback), then the same
engine path as completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from fastapi.responses import Response

from adasd_core.errors import InvalidRequestError
from server.engine_client import PromptScores, RequestGroup, SubRequest, TokenDelta
from server.errors import UnsupportedError
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
from server.serving import Choices, ChunkFrame, OpenAIServing, TokenOutput, collect_choices, make_usage, stream_choices


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
        return await self.respond(raw_request, request.stream,
                                  lambda: self._stream(request, group, rid, created, len(ids)),
                                  lambda: self._collect(request, group, rid, created, len(ids)))

    async def _collect(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                       prompt_tokens: int) -> ChatCompletionResponse:
        logprobs = [ChatLogprobs(content=[]) if request.logprobs else None for _ in range(group.size)]

        def add(index: int, out: TokenOutput) -> None:
            if isinstance(out, TokenDelta) and logprobs[index] is not None and out.logprobs:
                logprobs[index].content.extend(_chat_logprobs(out.logprobs))

        choices = await collect_choices(group, Choices.of(request, group.size), add)
        return ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, system_fingerprint=group.fingerprint,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=choices.text(i)), logprobs=logprobs[i],
                                finish_reason=choices.finish[i], adasd=choices.sources[i]) for i in range(group.size)],
            usage=make_usage(prompt_tokens, choices.stats))

    def _stream(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                prompt_tokens: int) -> AsyncIterator[str]:
        frame = ChunkFrame(rid, "chat.completion.chunk", created, self.model_name, group.fingerprint)

        def choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None,
                   adasd: dict | None = None) -> list[dict]:
            lp = {"content": [x.model_dump() for x in _chat_logprobs(logprobs)]} if logprobs else None
            out = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            if adasd:
                out["adasd"] = adasd
            return [out]

        def first() -> Iterator[str]:
            for i in range(group.size):
                yield frame(choice(i, {"role": "assistant", "content": ""}))

        def chunks(index: int, out: TokenOutput) -> Iterator[str]:
            if isinstance(out, PromptScores):  # chat never scores its prompt
                return
            if out.text or (request.logprobs and out.logprobs) or out.adasd:
                yield frame(choice(index, {"content": out.text}, logprobs=out.logprobs if request.logprobs else None,
                                   adasd=out.adasd))
            if out.finish_reason:
                yield frame(choice(index, {}, out.finish_reason))

        return stream_choices(group, frame, Choices.of(request, group.size), chunks, first,
                              usage_prompt_tokens=prompt_tokens if request.include_usage else None)


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
