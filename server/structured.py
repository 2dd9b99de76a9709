"""Structured outputs in the front end: a request's response_format, guided_* fields or forced tool
call -> the GrammarSpec the engine constrains its output with (every failure a 400 naming the field),
and a constrained tool call's output -> OpenAI's tool_calls. tool_choice "auto" is not constrained:
the model's template lists the tools and its family's parser reads the calls (server/tool_parsers.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from adasd_core.errors import InvalidRequestError
from adasd_core.grammar import GrammarSpec, choice_spec, json_schema_spec
from server.protocol import ChatCompletionRequest, FunctionCall, SamplingFields, ToolCall
from server.settings import ToolParserName
from server.tool_parsers import ParsedCall, ToolParser, auto_parser, parse


def output_grammar(request: SamplingFields) -> GrammarSpec | None:
    """The grammar of response_format or one guided_* field (None: free text); checked here, in the
    front end, so that a bad one is a 400 before anything is queued."""
    specs = []
    rf = request.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            specs.append(GrammarSpec("json_object", param="response_format"))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise InvalidRequestError('response_format json_schema needs {"json_schema": {"name": ..., '
                                          '"schema": {...}}}', param="response_format.json_schema")
            spec = json_schema_spec(js["schema"], "response_format.json_schema.schema")
            if js.get("strict") is False:  # best effort: keywords the library lacks are ignored, not refused
                spec = GrammarSpec(spec.kind, spec.value, spec.param, lenient=True)
            specs.append(spec)
        elif kind != "text":
            raise InvalidRequestError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                                      param="response_format.type")
    if request.guided_json is not None:
        specs.append(json_schema_spec(request.guided_json, "guided_json"))
    if request.guided_regex is not None:
        specs.append(GrammarSpec("regex", request.guided_regex, "guided_regex"))
    if request.guided_choice is not None:
        specs.append(choice_spec(request.guided_choice, "guided_choice"))
    if request.guided_grammar is not None:
        specs.append(GrammarSpec("lark", request.guided_grammar, "guided_grammar"))
    if len(specs) > 1:
        raise InvalidRequestError(f"{specs[0].param} and {specs[1].param} both constrain the output: send one",
                                  param=specs[1].param)
    for spec in specs:
        spec.check()
    return specs[0] if specs else None


# ---------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolMode:
    """A constrained tool call: `name` the named function (the output is its arguments), or None
    ("required": the output is {"name": ..., "arguments": {...}} over the tools)."""

    grammar: GrammarSpec
    name: str | None
    prompt: str  # what the model is told about the tools (a system message)


@dataclass(frozen=True)
class AutoTools:
    """tool_choice "auto": the tools go to the chat template, the output is parsed for calls."""

    parser: ToolParser
    tools: list[dict]
    parallel: bool  # parallel_tool_calls: false keeps the first call only

    def message(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """A whole output as the message's (content, tool_calls); no calls: (text, None)."""
        content, calls = parse(self.parser, text, self.parallel)
        return (content, [as_tool_call(c) for c in calls]) if calls else (text, None)


def as_tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(function=FunctionCall(name=call.name, arguments=call.arguments))


def tool_mode(request: ChatCompletionRequest, template: str | dict | None,
              parser: ToolParserName = "auto") -> ToolMode | AutoTools | None:
    """The tool call a request forces, or its "auto" tools (None: no tools, or tool_choice "none");
    `template` the model's chat template, `parser` the tool_parser setting (for "auto")."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        if isinstance(choice, dict) or choice in ("required",):
            raise InvalidRequestError(f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice")
        return None
    functions = {}
    for i, tool in enumerate(request.tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError('each tool is {"type": "function", "function": {"name": ..., "parameters": '
                                      '{...}}}', param=f"tools.{i}")
        functions[fn["name"]] = (i, fn)
    if choice in (None, "auto"):  # OpenAI's default with tools
        return AutoTools(auto_parser(parser, template), list(request.tools), request.parallel_tool_calls is not False)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in functions:
            raise InvalidRequestError(f"tool_choice names no function of tools ({', '.join(functions)})",
                                      param="tool_choice.function.name")
        chosen = {name: functions[name]}
    elif choice == "required":
        name, chosen = None, functions
    else:
        raise InvalidRequestError(f"tool_choice {choice!r} is not one of none, auto, required or a named function",
                                  param="tool_choice")
    schemas = {}
    for fname, (i, fn) in chosen.items():
        params = fn.get("parameters")
        if not isinstance(params, dict):
            raise InvalidRequestError(f"function {fname!r} has no parameters schema: a constrained call needs one "
                                      '(send {"type": "object", "properties": {}} for none)',
                                      param=f"tools.{i}.function.parameters")
        schemas[fname] = params
    if name is not None:
        schema = schemas[name]
        param = f"tools.{functions[name][0]}.function.parameters"
    else:
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for n, s in schemas.items()]}
        param = "tools"
    grammar = json_schema_spec(schema, param)
    grammar.check()
    # the names, parameters and descriptions only: the grammar holds the schemas (a short prompt for a short context)
    listing = "\n".join(f"- {n}({', '.join((schemas[n].get('properties') or {}).keys())})"
                         + (f": {fn['description']}" if fn.get("description") else "") for n, (_, fn) in chosen.items())
    shape = (f"Call {name} with its arguments as JSON." if name is not None
             else 'Reply with {"name": ..., "arguments": {...}}.')
    return ToolMode(grammar, name, f"Functions:\n{listing}\n{shape}")


def tool_calls(mode: ToolMode, text: str, call_id: str) -> list[ToolCall] | None:
    """The constrained output as OpenAI's tool_calls (the grammar makes it JSON of that shape); None
    where the output was cut short of a complete call ("required": the name is not known)."""
    if mode.name is not None:
        return [ToolCall(id=call_id, function=FunctionCall(name=mode.name, arguments=text))]
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError):
        return None
    return [ToolCall(id=call_id, function=FunctionCall(name=name, arguments=json.dumps(arguments)))]
