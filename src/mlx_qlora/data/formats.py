"""Record formats besides instructions: chat ``messages``, ShareGPT ``conversations``, ``prompt``/``completion``
and plain ``text``; which one a source holds is detected from its columns (``detect_format``).

| format        | columns                                                  | record       |
|---------------|----------------------------------------------------------|--------------|
| ``messages``  | ``messages`` (list of ``{"role", "content"}``), ``tools`` | Conversation |
| ``sharegpt``  | ``conversations`` (list of ``{"from", "value"}``)        | Conversation |
| ``completion``| ``prompt``, ``completion``                               | Completion   |
| ``text``      | ``text``                                                 | Text         |
| ``instruction``| Dolly's or Alpaca's columns (``sources.py``)            | Record       |

Roles are ``system``, ``user``, ``assistant`` and ``tool``; ShareGPT's ``human``/``gpt``/``system``/``tool``
(also ``function_call``/``observation``) map onto them; a separate ``system`` column, when there is one
and the conversation has no system message, becomes its first message. An assistant message may carry ``tool_calls``
instead of (or besides) text; every other message needs a non-empty string ``content``. A conversation needs at
least one assistant message. In a CSV file the ``messages`` / ``conversations`` / ``tools`` cells hold JSON
text. A bad row raises ``BadRow`` with what is wrong; ``sources`` names the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

NO_CATEGORY = "uncategorized"  # category of records from a source without a category column
FORMATS = ("auto", "instruction", "messages", "sharegpt", "completion", "text")
CONVERSATION_FORMATS = ("messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


class BadRow(Exception):
    """A row-level problem; ``sources`` turns it into a UserError naming the line, or a skip."""


@dataclass(frozen=True)
class Conversation:
    """One chat: ``messages`` (dicts with ``role`` and ``content``; ``tool_calls`` on assistant messages) and
    the ``tools`` the chat template is given (None: none)."""

    messages: tuple
    tools: Optional[tuple] = None
    category: str = NO_CATEGORY


@dataclass(frozen=True)
class Completion:
    """A prompt and the completion learned after it (raw text, no template)."""

    prompt: str
    completion: str
    category: str = NO_CATEGORY


@dataclass(frozen=True)
class Text:
    """Plain text for continued pre-training: every token is learned."""

    text: str
    category: str = NO_CATEGORY


def detect_format(keys) -> Optional[str]:
    """The format a row with these column names holds, or None for the instruction format's columns."""
    keys = set(keys)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys and not {"instruction", "response", "output"} & keys:
        return "text"
    return None


def _string(value: Any, what: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"{what} is not valid UTF-8") from None
    if required and not value.strip():
        raise BadRow(f"{what} is empty")
    return value


def _tool_calls(value: Any, what: str) -> list:
    if not isinstance(value, list) or not value:
        raise BadRow(f"{what} must be a non-empty list")
    calls = []
    for j, call in enumerate(value):
        if not isinstance(call, dict):
            raise BadRow(f"{what}[{j}] must be an object")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRow(f"{what}[{j}] needs a function name ('function': {{'name': ...}})")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI's wire format keeps arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise BadRow(f"{what}[{j}]: arguments are not valid JSON") from None
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def _message(raw: Any, index: int, role_key: str, content_key: str, role_map: Optional[dict]) -> dict:
    where = f"message {index}"
    if not isinstance(raw, dict):
        raise BadRow(f"{where} must be an object, got {type(raw).__name__}")
    role = raw.get(role_key)
    if role_map is not None:
        role = role_map.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        known = ", ".join(sorted(role_map)) if role_map is not None else ", ".join(ROLES)
        raise BadRow(f"{where}: unknown role {raw.get(role_key)!r} (known: {known})")
    message = {"role": role}
    if role == "assistant" and raw.get("tool_calls") is not None:
        message["content"] = _string(raw.get(content_key), f"{where} '{content_key}'", required=False)
        message["tool_calls"] = _tool_calls(raw["tool_calls"], f"{where} 'tool_calls'")
    else:
        message["content"] = _string(raw.get(content_key), f"{where} '{content_key}'")
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str):
            message[key] = raw[key]
    return message


def parse_conversation(row: dict, fmt: str, category: str) -> Conversation:
    """A ``Conversation`` from a ``messages`` or ShareGPT row; ``BadRow`` says what is wrong."""
    key, role_key, content_key, role_map = (
        ("messages", "role", "content", None) if fmt == "messages" else ("conversations", "from", "value", SHAREGPT_ROLES)
    )
    raw = row.get(key)
    if isinstance(raw, str):  # a CSV cell holds the list as JSON text
        try:
            raw = json.loads(raw)
        except ValueError:
            raise BadRow(f"key {key!r} is not valid JSON") from None
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"key {key!r} must be a non-empty list of messages")
    messages = tuple(_message(m, i, role_key, content_key, role_map) for i, m in enumerate(raw))
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = ({"role": "system", "content": system},) + messages  # ShareGPT's separate system column
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("the conversation has no assistant turn (nothing to learn)")
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except ValueError:
            raise BadRow("key 'tools' is not valid JSON") from None
    if tools is not None and tools != "":
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRow("key 'tools' must be a list of tool definitions (objects)")
        tools = tuple(tools) or None
    else:
        tools = None
    return Conversation(messages, tools, category)


def parse_row(row: dict, fmt: str, category: str):
    """The record of one row in a non-instruction format (``Conversation``, ``Completion`` or ``Text``)."""
    if fmt in CONVERSATION_FORMATS:
        return parse_conversation(row, fmt, category)
    if fmt == "completion":
        return Completion(_string(row.get("prompt"), "key 'prompt'"),
                          _string(row.get("completion"), "key 'completion'"), category)
    if fmt == "text":
        return Text(_string(row.get("text"), "key 'text'"), category)
    raise ValueError(f"unknown format {fmt!r}")


def record_kind(record) -> str:
    """``"instruction"``, ``"conversation"``, ``"completion"`` or ``"text"``."""
    return {"Conversation": "conversation", "Completion": "completion", "Text": "text"}.get(
        type(record).__name__, "instruction")


def category_of(row: dict) -> str:
    """A row's ``category`` column when it is a non-empty string, else ``uncategorized``."""
    value = row.get("category")
    return value.strip() if isinstance(value, str) and value.strip() else NO_CATEGORY


__all__ = ["FORMATS", "CONVERSATION_FORMATS", "ROLES", "Conversation", "Completion", "Text", "detect_format",
           "parse_conversation", "parse_row", "record_kind", "category_of",
           "BadRow", "NO_CATEGORY"]
