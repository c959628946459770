"""Prompt templates: exact text, context only when present, conversations."""

from __future__ import annotations

import pytest

from mlx_qlora.data import TEMPLATES, chat_turns, format_prompt, format_response
from mlx_qlora.errors import UserError


def test_dolly():
    assert format_prompt("dolly", "Name a river.") == "### Instruction:\nName a river.\n\n### Response:\n"
    assert format_prompt("dolly", "Summarize.", "Text.") == (
        "### Instruction:\nSummarize.\n\n### Context:\nText.\n\n### Response:\n"
    )
    assert format_prompt("dolly", "Name a river.", "  \n ") == format_prompt("dolly", "Name a river.")
    assert format_response("dolly", "The Nile.") == "The Nile."


def test_alpaca():
    plain = format_prompt("alpaca", "Add 2 and 3.")
    assert plain.startswith("Below is an instruction that describes a task. Write a response")
    assert plain.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and "### Input" not in plain
    with_input = format_prompt("alpaca", "Add.", "2 and 3")
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")


def test_mistral():
    assert format_prompt("mistral", "hi") == "[INST] hi [/INST]"
    assert format_prompt("mistral", "Summarize.", "Text.") == "[INST] Summarize.\n\nText. [/INST]"
    assert format_response("mistral", "ok") == " ok"


def test_user_text_with_braces_is_kept():
    assert format_prompt("dolly", "Fill {x} and {}", "{context}") == (
        "### Instruction:\nFill {x} and {}\n\n### Context:\n{context}\n\n### Response:\n"
    )


def test_unknown_template():
    with pytest.raises(UserError, match="unknown prompt template 'chatml'; choose one of dolly, alpaca, mistral"):
        format_prompt("chatml", "x")
    assert set(TEMPLATES) == {"dolly", "alpaca", "mistral"}


def test_chat_turns():
    turns = chat_turns("mistral", [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2", "context": "ctx"},
    ])
    assert turns == [("[INST] q1 [/INST]", " a1"), ("[INST] q2\n\nctx [/INST]", None)]
    with pytest.raises(UserError, match="message 1: expected role 'assistant'"):
        chat_turns("dolly", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(UserError, match="at least one user message"):
        chat_turns("dolly", [])
