"""Pydantic request and response models of the OpenAI-compatible API (the subset adasd serves).

Unknown request fields are ignored, as vLLM does. Fields OpenAI defines but adasd cannot honour
(best_of, suffix) are accepted at their neutral value and refused otherwise by the serving layer,
with a message that says so. Structured outputs: `response_format` (json_object, json_schema) and
vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark); tools with
`tool_choice` "required", a named function or "auto" (docs/structured-outputs.md).

Below the schema, requests are checked here too, so that no such input reaches the tokenizer or
the engine: every string field must be valid Unicode (JSON allows a lone UTF-16 surrogate such as
"\\udc80", which the tokenizer cannot encode), numbers must be finite (Python's JSON accepts NaN and
Infinity), token ids are non-negative JSON integers (not booleans, floats or strings), and chat
roles are the ones OpenAI accepts. Each failure is a 400 naming the field (server/errors.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
INT_MAX = 2**31 - 1  # bound of counts and lengths: Python ints are unbounded (a 4300-digit max_tokens was a 500)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIBaseModel):
    """Request bodies: NaN and +-Infinity are refused in every float field."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# error types of the checks below; server/errors.py reports them before a union's other complaints
OWN_ERROR_TYPES = frozenset({"invalid_unicode", "invalid_token_id"})
TOKEN_ID_MAX = INT_MAX  # beyond any vocabulary; the model's own bound is checked once it is known


def check_text(value: str) -> str:
    """Refuse strings that are not valid Unicode: they hold a lone (unpaired) UTF-16 surrogate."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode",
            "not valid Unicode: a lone UTF-16 surrogate ({char}) at character {pos}; send text as valid "
            "UTF-8 or surrogate pairs",
            {"char": f"\\u{ord(value[exc.start]):04x}", "pos": exc.start},
        ) from None
    return value


def check_token_id(value: int) -> int:
    if not 0 <= value <= TOKEN_ID_MAX:
        shown = str(value) if len(str(value)) <= 24 else f"a {len(str(value))}-digit number"
        raise PydanticCustomError("invalid_token_id", "token ids are integers from 0 to the vocabulary size - 1 "
                                  "(got {shown})", {"shown": shown})
    return value


Text = Annotated[str, AfterValidator(check_text)]
TokenId = Annotated[StrictInt, AfterValidator(check_token_id)]  # StrictInt: no true, 2.0 or "2"
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]  # as OpenAI ("function": deprecated)


# ---------------------------------------------------------------------------- requests


class AdasdOptions(RequestModel):
    """Extension: which speculative method this request runs (defaults come from the config)."""

    method: Text | None = None  # ar | vanilla | gen-only | verify-only | adasd | hybrid
    k: int | None = Field(None, le=INT_MAX)  # draft length for vanilla / verify-only
    verification: Text | None = None  # bayes | threshold | none
    warm_start: bool | None = None  # False: start from empty statistics (reproducible seeded runs)
    token_sources: bool = False  # True: each choice carries `adasd.token_sources` and `adasd.rounds`


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Fields both endpoints share."""

    model: Text | None = None
    temperature: float | None = Field(1.0, ge=0.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT_MAX)  # extension; 0 or -1 disables it
    n: int = Field(1, ge=1, le=128)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    ignore_eos: bool = False  # extension (vLLM)
    # extensions (vLLM): sampling controls
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[TokenId] | None = None
    # structured outputs: OpenAI's, and vLLM's guided_* extensions (one of them per request)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None  # Lark
    adasd: AdasdOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: list[TokenId] | list[list[TokenId]] | Text | list[Text]
    max_tokens: int | None = Field(16, ge=0, le=INT_MAX)  # 0: only with echo (scoring a prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # with echo: the prompt's tokens too
    best_of: int | None = Field(None, ge=1, le=INT_MAX)
    suffix: Text | None = None


class ContentPart(RequestModel):
    type: Text
    text: Text | None = None


class MessageFunctionCall(RequestModel):
    name: Text
    arguments: Text = "{}"  # JSON text, as OpenAI returns it


class MessageToolCall(RequestModel):
    """A call in an earlier assistant message (multi-turn tool use)."""

    id: Text | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(RequestModel):
    role: Role
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: Text | None = None  # tool: the call it answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)  # None: up to the context
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Text | dict[str, Any] | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = None


# ---------------------------------------------------------------------------- responses


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    speculative: dict[str, Any] | None = None  # GenerationStats.to_dict(), summed over choices


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class RejectedToken(OpenAIBaseModel):
    token_id: int
    text: str


class TokenSourceInfo(OpenAIBaseModel):
    """Where one emitted token came from (adasd_core.sequence.TokenSource)."""

    token_id: int
    text: str  # its share of the output text (before a stop string cuts it)
    source: Literal["standard", "relaxed", "correction", "bonus", "ar", "forced"]
    round: int  # from 1
    entropy: float | None = None  # draft entropy at this position (nats)
    js_distance: float | None = None  # where the relaxed check is on
    posterior: float | None = None  # P(A|d), where the Bayesian check was consulted
    rejected: RejectedToken | None = None  # correction: the draft's candidate it replaced


class RoundInfo(OpenAIBaseModel):
    """One round of a request, with the statistics' state after it."""

    round: int
    drafted: int
    accepted: int  # standard + relaxed
    relaxed: int
    entropy_threshold: float | None = None  # T_G
    js_threshold: float | None = None  # T_V (threshold check)
    kde_accepted: int | None = None  # KDE sample sizes (Bayesian check)
    kde_rejected: int | None = None
    estimated_speedup: float | None = None  # of the request so far


class ChoiceExtension(OpenAIBaseModel):
    """`adasd` of a choice, with the request option adasd.token_sources."""

    token_sources: list[TokenSourceInfo] = Field(default_factory=list)
    rounds: list[RoundInfo] = Field(default_factory=list)


def _absent_if_none(value) -> bool:
    return value is None


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    adasd: ChoiceExtension | None = Field(None, exclude_if=_absent_if_none)  # off: the OpenAI shape exactly


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None  # what the answer depends on besides the request (docs/reproducibility.md)
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_absent_if_none)


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    adasd: ChoiceExtension | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "adasd"
    root: str | None = None
    parent: str | None = None  # a per-method alias (`<served name>:<method>`): the served name
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------------------- tokenizer endpoints (vLLM's shapes)


class TokenizeRequest(RequestModel):
    """POST /tokenize: a `prompt` string, or chat `messages` rendered by the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: rendered by the chat template, as vLLM
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template adds them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
