"""POST /v1/chat/completions: the tokenizer's chat template (or a plain fallback), then the same
engine path as completions. A forced tool call (tool_choice "required" or a named function) is a
grammar over the functions' parameter schemas, returned as tool_calls (server/structured.py);
tool_choice "auto" renders the tools through the model's template and parses its free output with
the family's tool-call parser (server/tool_parsers.py)."""

from __future__ import annotations

import json
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
from server.structured import AutoTools, ToolMode, output_grammar, tool_calls, tool_mode
from server.tool_parsers import ToolStream


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        alias_method = self.check_model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        grammar = output_grammar(request)
        self.check_ready()
        mode = tool_mode(request, self.tokenizer.chat_template, self.settings.tool_parser)
        if isinstance(mode, ToolMode):
            if grammar is not None:
                raise InvalidRequestError(f"{grammar.param} and a forced tool call both constrain the output: send one",
                                          param=grammar.param)
            grammar = mode.grammar
        spec = self.spec_config(request.adasd, alias_method)

        messages = _messages(request)
        if isinstance(mode, ToolMode):  # the functions, told in a system message (the template may have no tools)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + mode.prompt}
            else:
                messages.insert(0, {"role": "system", "content": mode.prompt})
        ids = await self.tokenizer.encode_chat(messages, tools=mode.tools if isinstance(mode, AutoTools) else None)
        max_tokens = request.max_completion_tokens or request.max_tokens
        max_tokens = self.check_prompt(ids, max_tokens, param="messages")
        top = (request.top_logprobs or 0) if request.logprobs else None
        subs = [SubRequest(ids, self.sampling_params(request, max_tokens, top, j, grammar), spec)
                for j in range(request.n)]

        group = self.client.submit(subs, spec.method, self.fingerprint_key(spec, subs[0].params))
        rid, created = random_id("chatcmpl"), int(time.time())
        return await self.respond(raw_request, request.stream,
                                  lambda: self._stream(request, group, rid, created, len(ids), mode),
                                  lambda: self._collect(request, group, rid, created, len(ids), mode))

    async def _collect(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                       prompt_tokens: int, mode: ToolMode | AutoTools | None) -> ChatCompletionResponse:
        logprobs = [ChatLogprobs(content=[]) if request.logprobs else None for _ in range(group.size)]

        def add(index: int, out: TokenOutput) -> None:
            if isinstance(out, TokenDelta) and logprobs[index] is not None and out.logprobs:
                logprobs[index].content.extend(_chat_logprobs(out.logprobs))

        choices = await collect_choices(group, Choices.of(request, group.size), add)

        def message(i: int) -> tuple[ChatResponseMessage, str | None]:
            content, calls = choices.text(i), None
            if isinstance(mode, AutoTools):
                content, calls = mode.message(content)
            elif mode is not None:
                calls = tool_calls(mode, content, random_id("call"))
                content = None if calls is not None else content
            if calls is None:
                return ChatResponseMessage(content=content), choices.finish[i]
            finish = "tool_calls" if choices.finish[i] == "stop" else choices.finish[i]
            return ChatResponseMessage(content=content, tool_calls=calls), finish

        messages = [message(i) for i in range(group.size)]
        return ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, system_fingerprint=group.fingerprint,
            choices=[ChatChoice(index=i, message=messages[i][0], logprobs=logprobs[i], finish_reason=messages[i][1],
                                adasd=choices.sources[i]) for i in range(group.size)],
            usage=make_usage(prompt_tokens, choices.stats))

    def _stream(self, request: ChatCompletionRequest, group: RequestGroup, rid: str, created: int,
                prompt_tokens: int, mode: ToolMode | AutoTools | None) -> AsyncIterator[str]:
        frame = ChunkFrame(rid, "chat.completion.chunk", created, self.model_name, group.fingerprint)
        call_ids = [random_id("call") for _ in range(group.size)]
        held = [[] for _ in range(group.size)]  # "required": a choice's text until its call is complete
        auto = ([ToolStream(mode.parser, mode.parallel) for _ in range(group.size)]
                if isinstance(mode, AutoTools) else None)

        def choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None,
                   adasd: dict | None = None) -> list[dict]:
            lp = {"content": [x.model_dump() for x in _chat_logprobs(logprobs)]} if logprobs else None
            out = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            if adasd:
                out["adasd"] = adasd
            return [out]

        def first() -> Iterator[str]:
            for i in range(group.size):
                if isinstance(mode, ToolMode) and mode.name is not None:  # the call's head; its arguments stream
                    yield frame(choice(i, {"role": "assistant", "content": None, "tool_calls": [
                        {"index": 0, "id": call_ids[i], "type": "function",
                         "function": {"name": mode.name, "arguments": ""}}]}))
                else:
                    yield frame(choice(i, {"role": "assistant", "content": None if isinstance(mode, ToolMode) else ""}))

        def chunks(index: int, out: TokenOutput) -> Iterator[str]:
            if isinstance(out, PromptScores):  # chat never scores its prompt
                return
            if isinstance(mode, ToolMode):
                yield from tool_chunks(index, out)
                return
            text = auto[index].feed(out.text) if auto else out.text
            if text or (request.logprobs and out.logprobs) or out.adasd:
                yield frame(choice(index, {"content": text}, logprobs=out.logprobs if request.logprobs else None,
                                   adasd=out.adasd))
            if not out.finish_reason:
                return
            finish = out.finish_reason
            if auto:  # what was held back: content, or the calls (each whole, in one delta)
                tail, calls = auto[index].finish()
                if tail:
                    yield frame(choice(index, {"content": tail}))
                for j, call in enumerate(calls):
                    yield frame(choice(index, {"tool_calls": [{"index": j, "id": random_id("call"), "type": "function",
                                                               "function": {"name": call.name,
                                                                            "arguments": call.arguments}}]}))
                finish = "tool_calls" if calls and finish == "stop" else finish
            yield frame(choice(index, {}, finish))

        def tool_chunks(index: int, out: TokenDelta) -> Iterator[str]:
            finish = "tool_calls" if out.finish_reason == "stop" else out.finish_reason
            if mode.name is not None:
                if out.text:
                    yield frame(choice(index, {"tool_calls": [{"index": 0, "function": {"arguments": out.text}}]}))
            else:
                held[index].append(out.text)
                calls = tool_calls(mode, "".join(held[index]), call_ids[index]) if out.finish_reason else None
                if calls is not None:
                    yield frame(choice(index, {"tool_calls": [{"index": 0, **calls[0].model_dump()}]}))
                elif out.finish_reason:  # cut short: what there is, as content
                    yield frame(choice(index, {"content": "".join(held[index])}))
            if out.finish_reason:
                yield frame(choice(index, {}, finish))

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
        message = {"role": m.role, "content": content or ""}
        if m.tool_calls:  # the shape HF templates read: arguments as a dict (they render it with tojson)
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments(text: str) -> dict | str:
    """A call's JSON arguments as the object (left as text where they are not one)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _chat_logprobs(entries: list) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()),
                         top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in top])
        for token, logprob, top in entries
    ]
