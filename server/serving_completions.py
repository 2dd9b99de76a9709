"""POST /v1/completions: returns a CompletionResponse, an SSE stream, or raises an AdasdError.

`echo` with `logprobs` scores the prompt, as OpenAI's legacy API and vLLM do: the prompt's tokens
with their log-probabilities under the target (the first token has none: null), then the
generated ones; `max_tokens: 0` scores without generating (what evaluation harnesses send for
log-likelihood tasks). The engine runs the target alone over the prompt for it (no draft work).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adasd_core.errors import AdasdError, InvalidRequestError
from server.engine_client import Failed, Finished, PromptScores, RequestGroup, SubRequest, TokenDelta
from server.errors import InternalError, UnsupportedError
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        alias_method = self.check_model(request.model)
        self.check_unsupported(request)
        if request.best_of not in (None, request.n):
            raise UnsupportedError("best_of", "best_of must equal n (or be omitted): this server returns every sample")
        if request.suffix:
            raise UnsupportedError("suffix")
        if request.max_tokens == 0 and not request.echo:
            raise InvalidRequestError("max_tokens 0 returns nothing without echo: send echo: true (with logprobs to "
                                      "score the prompt) or max_tokens >= 1", param="max_tokens")
        self.check_ready()
        spec = self.spec_config(request.adasd, alias_method)
        count = len(request.prompt) if isinstance(request.prompt, list) and request.prompt and \
            not isinstance(request.prompt[0], int) else 1
        if count * request.n > self.client.capacity:  # before tokenizing them all (150k prompts: 16 s)
            raise InvalidRequestError(
                f"this request needs {count * request.n} generations (prompts x n) but the server holds at most "
                f"{self.client.capacity} at once (max_running + max_queue); send fewer", param="prompt" if count > 1 else "n")

        prompts = await self._prompt_ids(request.prompt)
        scored = request.echo and request.logprobs is not None
        subs, prompt_tokens = [], 0
        for ids in prompts:
            max_tokens = self.check_prompt(ids, request.max_tokens)
            prompt_tokens += len(ids)
            for j in range(request.n):
                params = self.sampling_params(request, max_tokens, request.logprobs, j)
                if scored:
                    params = replace(params, prompt_logprobs=request.logprobs)
                subs.append(SubRequest(ids, params, spec))
        echo = [await self.tokenizer.decode(ids) for ids in prompts] if request.echo else None

        group = self.client.submit(subs, spec.method, self.fingerprint_key(spec, subs[0].params))
        rid, created = random_id("cmpl"), int(time.time())
        if request.stream:
            stream = self._stream(request, group, rid, created, prompt_tokens, echo)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response = await cancel_on_disconnect(raw_request, self._collect(request, group, rid, created, prompt_tokens, echo))
        if response is None:  # the client is gone
            return Response(status_code=499)
        return JSONResponse(response.model_dump())

    async def _prompt_ids(self, prompt) -> list[list[int]]:
        """str | [str] | [int] | [[int]] -> one token-id list per prompt."""
        if isinstance(prompt, str):
            return [await self.tokenizer.encode(prompt)]
        if not prompt:
            raise InvalidRequestError("the prompt is empty: send a string or token ids", param="prompt")
        if isinstance(prompt[0], str):
            return [await self.tokenizer.encode(p) for p in prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [list(p) for p in prompt]

    # ------------------------------------------------------------------ non-streaming

    async def _collect(self, request: CompletionRequest, group: RequestGroup, rid: str, created: int,
                       prompt_tokens: int, echo: list[str] | None) -> CompletionResponse:
        n = request.n
        texts: list[list[str]] = [[echo[i // n]] if echo else [] for i in range(group.size)]
        finish: list[str | None] = [None] * group.size
        stats: list[dict | None] = [None] * group.size
        logprobs = [CompletionLogprobs() if request.logprobs is not None else None for _ in range(group.size)]
        sources = source_accumulators(request, group.size)
        try:
            async for index, out in group:
                if isinstance(out, TokenDelta):
                    texts[index].append(out.text)
                    if logprobs[index] is not None and out.logprobs:
                        _extend_logprobs(logprobs[index], out.logprobs, sum(map(len, texts[index][:-1])))
                    collect_sources(sources[index], out.adasd)
                    finish[index] = out.finish_reason or finish[index]
                elif isinstance(out, PromptScores):  # before any TokenDelta of its choice
                    _extend_logprobs(logprobs[index], out.logprobs, 0)
                elif isinstance(out, Finished):
                    stats[index] = out.stats
                elif isinstance(out, Failed):
                    raise out.error
        finally:
            group.abort()
        choices = [CompletionChoice(index=i, text="".join(texts[i]), logprobs=logprobs[i], finish_reason=finish[i],
                                    adasd=sources[i]) for i in range(group.size)]
        return CompletionResponse(id=rid, created=created, model=self.model_name, system_fingerprint=group.fingerprint,
                                  choices=choices, usage=make_usage(prompt_tokens, stats))

    # ------------------------------------------------------------------ streaming

    async def _stream(self, request: CompletionRequest, group: RequestGroup, rid: str, created: int,
                      prompt_tokens: int, echo: list[str] | None) -> AsyncIterator[str]:
        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None,
                  adasd: dict | None = None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs.model_dump() if logprobs else None,
                      "finish_reason": finish_reason}
            if adasd:
                choice["adasd"] = adasd
            return sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "system_fingerprint": group.fingerprint, "choices": [choice]})

        stats: list[dict | None] = [None] * group.size
        offsets = [0] * group.size
        try:
            if echo and request.logprobs is None:  # with logprobs the echo waits for the prompt's scores
                for i in range(group.size):
                    text = echo[i // request.n]
                    offsets[i] = len(text)
                    yield chunk(i, text)
            async for index, out in group:
                if isinstance(out, TokenDelta):
                    lp = None
                    if request.logprobs is not None and out.logprobs:
                        lp = CompletionLogprobs()
                        _extend_logprobs(lp, out.logprobs, offsets[index])
                    if out.text or out.finish_reason or lp or out.adasd:
                        offsets[index] += len(out.text)
                        yield chunk(index, out.text, out.finish_reason, lp, out.adasd)
                elif isinstance(out, PromptScores):
                    lp = CompletionLogprobs()
                    _extend_logprobs(lp, out.logprobs, 0)
                    text = echo[index // request.n]
                    offsets[index] = len(text)
                    yield chunk(index, text, None, lp)
                elif isinstance(out, Finished):
                    stats[index] = out.stats
                elif isinstance(out, Failed):
                    raise out.error
            if request.include_usage:
                usage = make_usage(prompt_tokens, stats)
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                           "system_fingerprint": group.fingerprint, "choices": [], "usage": usage.model_dump()})
        except AdasdError as exc:  # after the first chunk, errors travel inside the stream
            yield sse_error(exc)
        except Exception:
            log.exception("completion stream failed")
            yield sse_error(InternalError())
        finally:
            group.abort()
        yield SSE_DONE


def _extend_logprobs(lp: CompletionLogprobs, entries: list, offset: int) -> None:
    for token, logprob, top in entries:
        lp.text_offset.append(offset)
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(None if top is None else {t: v for t, v in top})
        offset += len(token)
