"""How tools meet a model: the prompt that offers them, the turns of earlier calls and results, the
grammar a call is decoded under, and how a reply is read back as calls.

Two formats:

- **native** (`HermesTools`): the model's chat template knows tools and writes calls as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Hermes convention of Qwen2.5,
  Qwen3, Hermes, SmolLM3 and others). The template gets `tools=` and renders calls and results
  itself, in transformers' message shapes (assistant `tool_calls` with arguments as an object,
  `role: "tool"` results), so the model sees the format it was trained on.
- **generic** (`GenericTools`): for every other template. The functions and the call format go
  into the system turn (`TOOLS_PROMPT`), a call is the JSON object `{"tool_calls": [{"name",
  "arguments"}]}`, an earlier call is that JSON in its assistant turn and a result a user turn.

`tool_format(tokenizer)` picks one per model. Either way the call is decoded under a grammar that
holds each function's parameters schema, so arguments are valid by construction; with
`tool_choice: auto` the reply's first token decides between a call (a token that could begin the
format's `opener`) and text.
"""

from __future__ import annotations

import functools
import json
import re
import uuid

MAX_PARALLEL_CALLS = 4    # tool calls in one reply when parallel_tool_calls allows several

TOOLS_PROMPT = ("You can call functions. They are described by these JSON schemas:\n{tools}\n"
                "To call functions, answer with only this JSON object and nothing else: "
                '{{"tool_calls": [{{"name": <a function name>, "arguments": <its arguments as a JSON object>}}]}}')

# compact separators, as the JSON grammars elsewhere: a model may otherwise spend its budget on whitespace
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_schema(fn) -> dict:
    """One call of `fn` (a FunctionDef): its name and its arguments under its parameters schema."""
    return {"type": "object", "properties": {"name": {"const": fn.name},
                                             "arguments": fn.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def _call(name, arguments) -> dict:
    """A call as OpenAI's tool_calls entry (a fresh id; arguments as a JSON string)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolFormat:
    opener = "{"                # what a call begins with

    def may_be_call(self, begun: str) -> bool:
        """Whether a reply beginning with `begun` (stripped, non-empty) may still be a call."""
        return begun.startswith(self.opener) or self.opener.startswith(begun)


class GenericTools(ToolFormat):
    """isthmus's documented format for templates that do not know tools (docs/api.md)."""

    name = "generic"

    def system_note(self, tools) -> str | None:
        listing = json.dumps([{"name": t.function.name, "description": t.function.description or "",
                               "parameters": t.function.parameters or {"type": "object"}} for t in tools],
                             ensure_ascii=False)
        return TOOLS_PROMPT.format(tools=listing)

    def template_kwargs(self, tools) -> dict:
        return {}

    def call_turn(self, calls, content: str) -> dict:
        text = json.dumps({"tool_calls": [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                                          for c in calls]}, ensure_ascii=False)
        return {"role": "assistant", "content": text}

    def result_turn(self, call_id: str, name: str | None, content: str) -> dict:
        return {"role": "user", "content": f"[result of tool call {call_id}] {content}"}

    def grammar(self, tools, parallel: bool) -> tuple[str, dict]:
        """("json", schema) or ("lark", grammar) for runtime.constraints.Grammar."""
        return "json", {"type": "object", "properties": {"tool_calls": {
            "type": "array", "items": {"anyOf": [_call_schema(t.function) for t in tools]},
            "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}},
            "required": ["tool_calls"], "additionalProperties": False}

    def parse(self, text: str) -> list[dict] | None:
        if not text.lstrip().startswith("{"):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        calls = value.get("tool_calls") if isinstance(value, dict) else None
        if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
            return None
        return [_call(c["name"], c.get("arguments", {})) for c in calls]


class HermesTools(ToolFormat):
    """The model's own template, for templates that write calls in `<tool_call>` tags."""

    name = "hermes"
    opener = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def system_note(self, tools) -> str | None:
        return None                     # the template describes the tools itself

    def template_kwargs(self, tools) -> dict:
        return {"tools": [{"type": "function", "function": {
            "name": t.function.name, "description": t.function.description or "",
            "parameters": t.function.parameters or {"type": "object"}}} for t in tools]}

    def call_turn(self, calls, content: str) -> dict:
        return {"role": "assistant", "content": content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                          "arguments": _arguments(c.function.arguments)}}
            for c in calls]}

    def result_turn(self, call_id: str, name: str | None, content: str) -> dict:
        turn = {"role": "tool", "tool_call_id": call_id, "content": content}
        if name is not None:
            turn["name"] = name
        return turn

    def grammar(self, tools, parallel: bool) -> tuple[str, dict]:
        schema = {"anyOf": [_call_schema(t.function) for t in tools], "x-guidance": _JSON_STYLE}
        more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return "lark", (f"start: call {more}\n"
                        'call: "<tool_call>\\n" arguments "\\n</tool_call>"\n'
                        f"arguments: %json {json.dumps(schema)}\n")

    def parse(self, text: str) -> list[dict] | None:
        text = text.strip()
        found = self._CALL.findall(text)
        if not found or self._CALL.sub("", text).strip():
            return None
        calls = []
        for body in found:
            try:
                value = json.loads(body)
            except ValueError:
                return None
            if not isinstance(value, dict) or "name" not in value:
                return None
            calls.append(_call(value["name"], value.get("arguments", {})))
        return calls


GENERIC, HERMES = GenericTools(), HermesTools()


def tool_format(tokenizer) -> ToolFormat:
    """The native format when the model's chat template knows tools and writes Hermes-style
    calls, else the generic one."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return HERMES if _knows_tools(template) and "<tool_call>" in template else GENERIC


@functools.lru_cache(maxsize=16)
def _knows_tools(template: str) -> bool:
    import jinja2
    from jinja2 import meta
    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return False

