"""POST /v1/completions: returns a CompletionResponse, an SSE stream, or raises an AdasdError.

`echo` with `logprobs` scores the prompt, as OpenAI's legacy API and vLLM do: the prompt's tokens
with their log-probabilities under the target (the first token has none: null), then the
generated ones; `max_tokens: 0` scores without generating (what evaluation harnesses send for
log-likelihood tasks). The engine runs the target alone over the prompt for it (no draft work).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response

from adasd_core.errors import InvalidRequestError
from server.engine_client import PromptScores, RequestGroup, SubRequest
from server.errors import UnsupportedError
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, random_id
from server.serving import Choices, ChunkFrame, OpenAIServing, TokenOutput, collect_choices, make_usage, stream_choices
from server.structured import output_grammar


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        alias_method = self.check_model(request.model)
        grammar = output_grammar(request)
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
                f"{self.client.capacity} at once (max_running + max_queue); send fewer",
                param="prompt" if count > 1 else "n")

        prompts = await self._prompt_ids(request.prompt)
        scored = request.echo and request.logprobs is not None
        subs, prompt_tokens = [], 0
        for ids in prompts:
            max_tokens = self.check_prompt(ids, request.max_tokens)
            prompt_tokens += len(ids)
            for j in range(request.n):
                params = self.sampling_params(request, max_tokens, request.logprobs, j, grammar)
                if scored:
                    params = replace(params, prompt_logprobs=request.logprobs)
                subs.append(SubRequest(ids, params, spec))
        echo = [await self.tokenizer.decode(ids) for ids in prompts] if request.echo else None

        group = self.client.submit(subs, spec.method, self.fingerprint_key(spec, subs[0].params))
        rid, created = random_id("cmpl"), int(time.time())
        return await self.respond(raw_request, request.stream,
                                  lambda: self._stream(request, group, rid, created, prompt_tokens, echo),
                                  lambda: self._collect(request, group, rid, created, prompt_tokens, echo))

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
        texts = [[echo[i // n]] if echo else [] for i in range(group.size)]
        logprobs = [CompletionLogprobs() if request.logprobs is not None else None for _ in range(group.size)]

        def add(index: int, out: TokenOutput) -> None:
            if isinstance(out, PromptScores):  # before any TokenDelta of its choice
                _extend_logprobs(logprobs[index], out.logprobs, 0)
            elif logprobs[index] is not None and out.logprobs:  # offset: where this delta's text starts
                _extend_logprobs(logprobs[index], out.logprobs, sum(map(len, texts[index][:-1])))

        choices = await collect_choices(group, Choices.of(request, group.size, texts), add)
        return CompletionResponse(
            id=rid, created=created, model=self.model_name, system_fingerprint=group.fingerprint,
            choices=[CompletionChoice(index=i, text=choices.text(i), logprobs=logprobs[i],
                                      finish_reason=choices.finish[i], adasd=choices.sources[i])
                     for i in range(group.size)],
            usage=make_usage(prompt_tokens, choices.stats))

    # ------------------------------------------------------------------ streaming

    def _stream(self, request: CompletionRequest, group: RequestGroup, rid: str, created: int,
                prompt_tokens: int, echo: list[str] | None) -> AsyncIterator[str]:
        frame = ChunkFrame(rid, "text_completion", created, self.model_name, group.fingerprint)
        offsets = [0] * group.size  # text sent so far per choice: where a token's text_offset starts

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None,
                  adasd: dict | None = None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs.model_dump() if logprobs else None,
                      "finish_reason": finish_reason}
            if adasd:
                choice["adasd"] = adasd
            offsets[index] += len(text)
            return frame([choice])

        def first() -> Iterator[str]:
            if echo and request.logprobs is None:  # with logprobs the echo waits for the prompt's scores
                for i in range(group.size):
                    yield chunk(i, echo[i // request.n])

        def chunks(index: int, out: TokenOutput) -> Iterator[str]:
            if isinstance(out, PromptScores):
                lp = CompletionLogprobs()
                _extend_logprobs(lp, out.logprobs, 0)
                yield chunk(index, echo[index // request.n], None, lp)
                return
            lp = None
            if request.logprobs is not None and out.logprobs:
                lp = CompletionLogprobs()
                _extend_logprobs(lp, out.logprobs, offsets[index])
            if out.text or out.finish_reason or lp or out.adasd:
                yield chunk(index, out.text, out.finish_reason, lp, out.adasd)

        return stream_choices(group, frame, Choices.of(request, group.size), chunks, first,
                              usage_prompt_tokens=prompt_tokens if request.include_usage else None)


def _extend_logprobs(lp: CompletionLogprobs, entries: list, offset: int) -> None:
    for token, logprob, top in entries:
        lp.text_offset.append(offset)
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(None if top is None else {t: v for t, v in top})
        offset += len(token)
