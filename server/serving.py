"""What both endpoints share: model and readiness checks, the tokenizer, request -> SamplingParams
and SpecConfig, length checks, usage with speculative statistics, SSE framing, and the loop that
consumes a RequestGroup (collected into one response, or streamed)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar, get_args

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from adasd_core.errors import AdasdError, ContextLengthError, InvalidRequestError
from adasd_core.stats import GenerationStats
from adasd_core.validation import check_prompt_ids
from server.engine_client import EngineClient, Failed, Finished, PromptScores, RequestGroup, TokenDelta
from server.errors import (
    InternalError,
    ModelNotFoundError,
    ServiceUnavailableError,
    error_dict,
)
from server.protocol import AdasdOptions, SamplingFields, UsageInfo
from server.settings import Method, Settings

log = logging.getLogger("adasd.server")

T = TypeVar("T")

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def load_tokenizer(settings: Settings):
    from transformers import AutoTokenizer

    from adasd_core.models import _fix_tokenizer, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.target, "target"),
                                              trust_remote_code=settings.trust_remote_code)
    _fix_tokenizer(tokenizer)
    return tokenizer


class Tokenizer:
    """The target's tokenizer in the front end. Calls run on one thread, off the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokenizer = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="adasd-tokenizer")

    async def load(self) -> None:
        self.tokenizer = await self._run(load_tokenizer, self.settings)

    @property
    def loaded(self) -> bool:
        return self.tokenizer is not None

    @property
    def chat_template(self) -> str | dict | None:
        """The tokenizer's chat template (a dict where it has several by name; None: the fallback is used)."""
        return getattr(self.tokenizer, "chat_template", None)

    def _run(self, fn, *args) -> Awaitable:
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._run(lambda: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, add_special_tokens: bool = False,
                          tools: list[dict] | None = None) -> list[int]:
        """`tools`: rendered by the template itself (tool_choice "auto"), in OpenAI's shape."""
        def render() -> list[int]:
            template = None if self.chat_template else FALLBACK_CHAT_TEMPLATE
            try:
                text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt, tools=tools,
                                                          **({"continue_final_message": True} if continue_final_message
                                                             else {}))
            except Exception as exc:  # a template that raises on these messages (e.g. role order)
                raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

        return await self._run(render)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class OpenAIServing:
    def __init__(self, settings: Settings, client: EngineClient, tokenizer: Tokenizer):
        self.settings = settings
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = settings.served_model_name

    # ------------------------------------------------------------------ checks

    @property
    def alias_methods(self) -> list[str]:
        """The methods with a served-model alias `<served name>:<method>` (ar alone without a draft)."""
        return [m for m in get_args(Method) if self.settings.draft is not None or m == "ar"]

    def check_model(self, model: str | None) -> str | None:
        """404 unless `model` is the served name or one of its per-method aliases; returns the alias's
        method (None: the plain name, or no model given). Aliases let a client that cannot send the
        `adasd` field (a harness, a chat UI) pick the method by model name."""
        if model is None or model == self.model_name:
            return None
        base, sep, method = model.rpartition(":")  # the served name may hold colons itself
        if sep and base == self.model_name and method in self.alias_methods:
            return method
        raise ModelNotFoundError(model, self.model_name)

    def check_ready(self) -> None:
        self.client.check_ready()
        if not self.tokenizer.loaded:
            raise ServiceUnavailableError("the tokenizer is still loading; retry shortly")

    @staticmethod
    def logit_bias(request: SamplingFields) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} -> {id: bias} (the ids' range is checked once the vocabulary is known)."""
        out = {}
        for key, value in (request.logit_bias or {}).items():
            if not key.isdigit() or len(key) > 10:
                raise InvalidRequestError(f"logit_bias keys are token ids as strings (got {key[:24]!r})",
                                          param="logit_bias")
            out[int(key)] = value
        return out or None

    @property
    def model_info(self) -> dict:
        info = self.client.info
        if info is None:  # the worker died while this request was being prepared
            self.client.check_ready()
            raise ServiceUnavailableError("the worker is not ready; retry shortly")
        return info

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str = "prompt") -> int:
        """Validate a tokenized prompt (from the field `param`); returns max_tokens (None: up to the context)."""
        info = self.model_info
        check_prompt_ids(ids, info["vocab_size"], info["context_length"], param)
        context, n = info["context_length"], len(ids)
        if max_tokens is None:
            return context - n
        if n + max_tokens > context:
            raise ContextLengthError(f"this model's context is {context} tokens, but the prompt has {n} and "
                                     f"max_tokens is {max_tokens} ({n + max_tokens} in all); shorten the prompt "
                                     f"or lower max_tokens", param="max_tokens")
        return max_tokens

    async def respond(self, raw_request: Request, streamed: bool, stream: Callable[[], AsyncIterator[str]],
                      collect: Callable[[], Awaitable[BaseModel]]) -> Response:
        """The SSE stream, or the collected response (499 if the client goes away before it is ready)."""
        if streamed:
            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response = await cancel_on_disconnect(raw_request, collect())
        if response is None:  # the client is gone
            return Response(status_code=499)
        return JSONResponse(response.model_dump())

    # ------------------------------------------------------------------ engine parameters

    def spec_config(self, opts: AdasdOptions | None, alias_method: str | None = None):
        """The request's SpecConfig: its `adasd` options over the model alias's method over the config."""
        from adasd_core.engine import SpecConfig

        s = self.settings
        opts = opts or AdasdOptions()
        if alias_method and opts.method and opts.method != alias_method:
            raise InvalidRequestError(f"the model {self.model_name}:{alias_method} runs method {alias_method!r} but "
                                      f"adasd.method is {opts.method!r}: drop one of them", param="adasd.method")
        try:
            return SpecConfig(method=opts.method or alias_method or s.method, k=opts.k if opts.k is not None else s.k,
                              verification=opts.verification or s.verification,
                              warm_start=opts.warm_start if opts.warm_start is not None else True,
                              token_sources=opts.token_sources)
        except AdasdError as exc:
            exc.param = f"adasd.{exc.param}" if exc.param else "adasd"
            raise

    @staticmethod
    def fingerprint_key(spec, params) -> str:
        """The worker's fingerprint table entry of a request (every choice has the same spec and temperature)."""
        from adasd_core.warm import fingerprint_key

        return fingerprint_key(spec.method, spec.verification, params.greedy, spec.warm_start)

    def sampling_params(self, request: SamplingFields, max_tokens: int, logprobs: int | None, choice: int,
                        grammar=None):
        """The engine's SamplingParams of one choice; `grammar` the GrammarSpec its output must match."""
        from adasd_core.sampling import SamplingParams

        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        # tiny temperatures (e.g. 1e-320) are greedy: SamplingParams.greedy is the one place that decides
        temperature = 1.0 if request.temperature is None else request.temperature
        seed = request.seed + choice if request.seed is not None else None  # n > 1: distinct, reproducible
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=max(0, request.top_k or 0),
            seed=seed,
            stop=stop,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            min_p=request.min_p or 0.0,
            logit_bias=self.logit_bias(request),
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            stop_token_ids=list(request.stop_token_ids or []),
            grammar=grammar,
        )


# ---------------------------------------------------------------------------- consuming a request group

TokenOutput = TokenDelta | PromptScores  # what an endpoint formats; endings are kept in Choices


@dataclass
class Choices:
    """Per choice of a response, what its outputs leave besides their formatting: the finish reason
    and statistics; for a non-streamed response also its text pieces and token sources."""

    finish: list[str | None]
    stats: list[dict | None]
    texts: list[list[str]]
    sources: list[dict | None]  # {"token_sources": [...], "rounds": [...]} gathered (None: not asked for)

    @classmethod
    def of(cls, request: SamplingFields, n: int, texts: list[list[str]] | None = None) -> Choices:
        on = bool(request.adasd and request.adasd.token_sources)
        return cls([None] * n, [None] * n, texts or [[] for _ in range(n)],
                   [{"token_sources": [], "rounds": []} if on else None for _ in range(n)])

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


async def token_outputs(group: RequestGroup, choices: Choices) -> AsyncIterator[tuple[int, TokenOutput]]:
    """(choice index, output) in arrival order; each choice's finish reason and statistics are kept in
    `choices`; a failed generation raises its error. The caller aborts the group when it stops."""
    async for index, out in group:
        if isinstance(out, Finished):
            choices.stats[index] = out.stats
        elif isinstance(out, Failed):
            raise out.error
        else:
            if isinstance(out, TokenDelta):
                choices.finish[index] = out.finish_reason or choices.finish[index]
            yield index, out


async def collect_choices(group: RequestGroup, choices: Choices, add: Callable[[int, TokenOutput], None]) -> Choices:
    """A non-streamed response's outputs: text and token sources into `choices`, then `add` (the
    endpoint's logprobs) with the choice's text so far."""
    try:
        async for index, out in token_outputs(group, choices):
            if isinstance(out, TokenDelta):
                choices.texts[index].append(out.text)
                acc = choices.sources[index]
                if acc is not None and out.adasd:
                    acc["token_sources"] += out.adasd["token_sources"]
                    acc["rounds"] += out.adasd["rounds"]
            add(index, out)
    finally:
        group.abort()
    return choices


@dataclass(frozen=True)
class ChunkFrame:
    """The fields every chunk of one stream repeats around its choices."""

    id: str
    object: str  # chat.completion.chunk | text_completion
    created: int
    model: str
    system_fingerprint: str | None

    def __call__(self, choices: list[dict], **extra) -> str:
        return sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                    "system_fingerprint": self.system_fingerprint, "choices": choices, **extra})


async def stream_choices(group: RequestGroup, frame: ChunkFrame, choices: Choices,
                         chunks: Callable[[int, TokenOutput], Iterable[str]],
                         first: Callable[[], Iterable[str]] = tuple,
                         usage_prompt_tokens: int | None = None) -> AsyncIterator[str]:
    """An SSE response: `first()` chunks, the endpoint's `chunks` of each output, a usage chunk when
    `usage_prompt_tokens` is given, then [DONE]. Errors after the first chunk travel inside the stream."""
    try:
        for text in first():
            yield text
        async for index, out in token_outputs(group, choices):
            for text in chunks(index, out):
                yield text
        if usage_prompt_tokens is not None:
            yield frame([], usage=make_usage(usage_prompt_tokens, choices.stats).model_dump())
    except AdasdError as exc:
        yield sse_error(exc)
    except Exception:
        log.exception("%s stream failed", frame.object)
        yield sse_error(InternalError())
    finally:
        group.abort()
    yield SSE_DONE


# ---------------------------------------------------------------------------- usage


def merge_stats(stats: list[dict]) -> dict[str, Any]:
    """GenerationStats dicts of several choices -> one dict of the same shape (counts summed)."""
    if len(stats) == 1:
        return stats[0]
    names = {f.name for f in fields(GenerationStats)} - {"trace"}
    total = GenerationStats(method=stats[0].get("method", ""))
    for s in stats:
        for name in names:
            value = s.get(name)
            if name in ("method", "target_step_s", "entropy_threshold", "js_threshold", "warm_start") or value is None:
                continue
            if isinstance(value, list):
                acc = getattr(total, name)
                acc.extend([0] * (len(value) - len(acc)))
                for i, v in enumerate(value):
                    acc[i] += v
            else:
                setattr(total, name, (getattr(total, name) or 0) + value)
    last = stats[-1]
    total.target_step_s = last.get("target_step_s", 0.0)
    total.entropy_threshold, total.js_threshold = last.get("entropy_threshold"), last.get("js_threshold")
    total.warm_start = last.get("warm_start")
    out = total.to_dict()
    out["choices"] = len(stats)
    return out


def make_usage(prompt_tokens: int, stats: list[dict | None]) -> UsageInfo:
    done = [s for s in stats if s]
    completion = sum(s.get("generated_tokens", 0) for s in done)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                     speculative=merge_stats(done) if done else None)


# ---------------------------------------------------------------------------- SSE and disconnects


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: AdasdError) -> str:
    return sse(error_dict(exc))


async def _wait_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(raw_request: Request, coro: Awaitable[T]) -> T | None:
    """Await `coro`, cancelling it if the client goes away first (its cleanup cancels the generations)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    log.info("client disconnected from %s; request cancelled", raw_request.url.path)
    return None
