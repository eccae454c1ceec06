"""Function calling (OpenAI's `tools` / `tool_choice`): the grammar a call is generated under, and the calls
read back from the answer.

A call is written the way Hermes-style chat templates (Qwen2.5, Hermes, SmolLM3) write it:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and generated under an llguidance grammar (xlora_core.constraints), so a call always parses and its arguments
follow the function's JSON schema:
- a named function (`tool_choice: {"type": "function", ...}`): the answer is its arguments, nothing else;
- `required`: one call (several, newline-separated, with `parallel_tool_calls`) of any of the tools;
- `auto`: either free text that does not begin with `<tool_call>`, or calls as for `required`;
- `none`: free text; the tools are still shown to the chat template.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xlora_core import ConstraintSpec
from xlora_core.constraints import JSON_WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema; absent: no arguments")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")

    def schema_(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    """A whole call in one stream chunk (OpenAI's delta shape, sent complete)."""

    index: int


def mode_of(tools: list[Tool] | None, choice: ToolChoice | None) -> str | NamedToolChoice | None:
    """What the model may do: None (no tools: free text), "none", "auto", "required", or the named function."""
    if not tools:
        return None
    return choice if choice is not None else "auto"  # OpenAI's default when tools are given


def constraint_for(tools: list[Tool], mode: str | NamedToolChoice, parallel: bool) -> ConstraintSpec | None:
    """The grammar of the answer; None for "none" (free text)."""
    if mode == "none":
        return None
    if isinstance(mode, NamedToolChoice):
        (tool,) = [t for t in tools if t.function.name == mode.function.name]
        return ConstraintSpec("json_schema", json.dumps(tool.function.schema_()))
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": t.function.schema_()},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ],
        "x-guidance": {"whitespace_pattern": JSON_WHITESPACE},
    }
    calls = 'call ("\\n" call)*' if parallel else "call"
    lark = [
        "%llguidance {}",
        "start: calls" if mode == "required" else "start: TEXT | calls",
        f"calls: {calls}",
        f"call: {json.dumps(OPEN)} args {json.dumps(CLOSE)}",
        f"args: %json {json.dumps(call)}",
        f"TEXT: /(.|\\n)*/ & ~/{OPEN}(.|\\n)*/",  # text, as long as it does not begin a call
    ]
    return ConstraintSpec("grammar", "\n".join(lark) + "\n")


def parse_calls(text: str, mode: str | NamedToolChoice) -> list[ToolCall] | None:
    """The calls in a finished answer, or None if it is text (or a call cut short by max_tokens)."""
    if isinstance(mode, NamedToolChoice):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [_call(mode.function.name, text)]
    if mode == "none" or not text.startswith(OPEN):
        return None
    calls = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        calls.append(_call(call["name"], json.dumps(call["arguments"])))
    return calls or None


def may_begin_a_call(text: str) -> bool:
    """Whether streamed text so far could still turn out to be a call (it is a prefix of, or begins with, OPEN)."""
    return OPEN.startswith(text) or text.startswith(OPEN)


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))
