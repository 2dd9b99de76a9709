"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the target's tokenizer, in vLLM's shapes.

Evaluation harnesses use them to count and cut contexts with the server's own tokenizer:
lm-eval's `local-completions` model (0.4.x) probes /tokenizer_info and /tokenize at start-up and,
when both answer, tokenizes every request through them (its "remote" tokenizer: no local copy of
the model's tokenizer needed), reading `eos_token` and `bos_token` from /tokenizer_info.
"""

from __future__ import annotations

from adasd_core.errors import InvalidRequestError
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.serving import OpenAIServing
from server.serving_chat import _messages

# tokenizer attributes /tokenizer_info reports (those of tokenizer_config.json that clients read)
INFO_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequestError("send exactly one of `prompt` (text) and `messages` (chat)", param="prompt")
        if request.messages is not None and request.continue_final_message and request.add_generation_prompt:
            raise InvalidRequestError("continue_final_message extends the last message, add_generation_prompt starts "
                                      "a new one: send add_generation_prompt: false with it",
                                      param="continue_final_message")
        self.check_ready()
        if request.messages is not None:
            ids = await self.tokenizer.encode_chat(_messages(request), request.add_generation_prompt,
                                                   request.continue_final_message, bool(request.add_special_tokens),
                                                   tools=request.tools)
        else:
            add = True if request.add_special_tokens is None else request.add_special_tokens
            ids = await self.tokenizer.encode(request.prompt, add_special_tokens=add)
        strs = self.tokenizer.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.model_info["context_length"], tokens=ids,
                                token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        self.check_ready()
        vocab = self.model_info["vocab_size"]
        bad = next((t for t in request.tokens if t >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        # special tokens stay: detokenize(tokenize(text)) gives the text back
        return DetokenizeResponse(prompt=await self.tokenizer.decode(request.tokens, skip_special_tokens=False))

    def tokenizer_info(self) -> dict:
        """The tokenizer's class, special tokens, chat template and the context (model_max_length)."""
        self.check_ready()
        tok = self.tokenizer.tokenizer
        info = {"tokenizer_class": type(tok).__name__}
        for name in INFO_TOKENS:
            value = getattr(tok, name, None)
            info[name] = str(value) if value is not None else None
        info["chat_template"] = getattr(tok, "chat_template", None)
        info["model_max_length"] = self.model_info["context_length"]
        info["vocab_size"] = self.model_info["vocab_size"]
        return info
