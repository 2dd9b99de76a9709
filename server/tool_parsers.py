"""Free-form tool calls (tool_choice "auto"), as vLLM's --tool-call-parser: the model's own chat
template lists the tools, the model writes its calls in its family's format, and the family's parser
turns the output into OpenAI's tool_calls (or leaves it content).

- hermes (Qwen2.5, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the
  text before the first block is content.
- llama3_json (Llama 3.1, 3.2): the whole output is `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`, several calls separated by `;`.

A block that is not such JSON makes the whole output content, as vLLM does: a half-formed call is
not executed."""

from __future__ import annotations

import json
from dataclasses import dataclass

from adasd_core.errors import InvalidRequestError
from server.settings import ToolParserName

PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def _call(obj: object, *keys: str) -> ParsedCall | None:
    """A decoded {"name": ..., <key>: {...}} as a call (the arguments may come as a JSON string)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    name: str

    def parse(self, text: str) -> tuple[str, list[ParsedCall]] | None:
        """(the content before the calls, the calls), or None: the output is content."""
        raise NotImplementedError

    def held(self, text: str, since: int = 0) -> int:
        """Where a streamed output may still turn into a call: the text before it is content for
        certain (`since`: an index known to be before that point, where the search starts)."""
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> tuple[str, list[ParsedCall]] | None:
        first = text.find(self.START)
        if first < 0:
            return None
        calls, at = [], first
        while at >= 0:
            body_at = at + len(self.START)
            end = text.find(self.END, body_at)
            body = text[body_at:] if end < 0 else text[body_at:end]  # unclosed: the model stopped after the JSON
            try:
                call = _call(json.loads(body), "arguments")
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
            at = -1 if end < 0 else text.find(self.START, end)
        return text[:first], calls

    def held(self, text: str, since: int = 0) -> int:
        at = text.find(self.START, since)
        if at >= 0:
            return at
        # a partial start marker at the end ("<tool_" ...) waits for the next piece
        for n in range(min(len(self.START) - 1, len(text) - since), 0, -1):
            if self.START.startswith(text[-n:]):
                return len(text) - n
        return len(text)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"  # special: usually gone from the decoded text already

    def _body(self, text: str) -> int | None:
        """Where the JSON starts, if the output is one (after blanks and the tag)."""
        at = len(text) - len(text.lstrip())
        if text.startswith(self.TAG, at):
            at += len(self.TAG)
            at += len(text[at:]) - len(text[at:].lstrip())
        return at if text.startswith("{", at) else None

    def parse(self, text: str) -> tuple[str, list[ParsedCall]] | None:
        at = self._body(text)
        if at is None:
            return None
        decoder, calls = json.JSONDecoder(), []
        while True:
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            call = _call(obj, "parameters", "arguments")
            if call is None:
                return None
            calls.append(call)
            rest = text[at:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            if not rest:
                return "", calls
            if not rest.startswith("{"):
                return None
            at = len(text) - len(rest)

    def held(self, text: str, since: int = 0) -> int:
        if since:  # already content
            return len(text)
        head = text.lstrip()
        if not head or self.TAG.startswith(head) or self._body(text) is not None:
            return 0
        if head.startswith(self.TAG) and not head[len(self.TAG):].strip():
            return 0
        return len(text)


def template_text(template: str | dict | None) -> str:
    """A chat template's text (a tokenizer may hold several, by name)."""
    return "\n".join(template.values()) if isinstance(template, dict) else (template or "")


def detect(template: str) -> str | None:
    """The parser a chat template's own tool-call format calls for (None: none of ours)."""
    if HermesParser.START in template:
        return "hermes"
    if Llama3JsonParser.TAG in template or "respond with a JSON for a function call" in template:
        return "llama3_json"
    return None


def auto_parser(setting: ToolParserName, template: str | dict | None) -> ToolParser:
    """The parser of tool_choice "auto" on this model, or a 400 saying why there is none."""
    text = template_text(template)
    why = None
    if "tools" not in text:
        why = "this model's chat template has no tools"
    elif setting == "none":
        why = "this server runs with tool_parser none"
    name = detect(text) if setting == "auto" else setting
    if why is None and name is None:
        why = ("no tool-call parser matches this model's chat template (start the server with --tool-call-parser "
               f"{' or '.join(PARSERS)})")
    if why is not None:
        raise InvalidRequestError(f'tool_choice "auto" is not supported: {why}; send tool_choice "required" or '
                                  '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    return HermesParser() if name == "hermes" else Llama3JsonParser()


class ToolStream:
    """One streamed choice under "auto": its content as it may go out, then its calls at the end."""

    def __init__(self, parser: ToolParser, parallel: bool = True):
        self.parser, self.parallel = parser, parallel
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> str:
        """The content that can go out now (held back: what may be the start of a call, and blanks
        before any content, which a call's message does not carry)."""
        self.text += piece
        end = self.parser.held(self.text, self.sent)
        if end <= self.sent or not self.text[:end].strip():
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The content still to go out, and the calls (none: the output was content)."""
        content, calls = parse(self.parser, self.text, self.parallel)
        if not calls:
            return self.text[self.sent:], []
        return (content or "")[self.sent:], calls


def parse(parser: ToolParser, text: str, parallel: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """A whole output as (content, calls): content None where only blanks come before calls; at most
    one call unless `parallel`."""
    parsed = parser.parse(text)
    if parsed is None or not parsed[1]:
        return text, []
    content, calls = parsed
    return (content if content.strip() else None), (calls if parallel else calls[:1])
