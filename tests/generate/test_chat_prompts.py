"""How generate.py builds prompts: the model's chat template by default when there is no training metadata,
a system prompt, and the history rendered in one go (oldest turns dropped, the system prompt kept)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from support import write_chat_tokenizer

from mlx_qlora.data import load_tokenizer
from mlx_qlora.data.conversation import generation_prompt_ids
from mlx_qlora.errors import UserError
from mlx_qlora.generate.chat import ChatSession
from mlx_qlora.generate.loading import resolve_template

CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _model(context: int):
    return SimpleNamespace(args=SimpleNamespace(max_position_embeddings=context))  # only its context is read


def test_default_template(tmp_path, tiny_spm_path):
    tok = load_tokenizer(write_chat_tokenizer(tmp_path / "tok", CHATML))
    assert resolve_template(None, None, tmp_path, tok)[0] == "chat"
    assert resolve_template(None, None, tmp_path, load_tokenizer(tiny_spm_path))[0] == "dolly"
    assert resolve_template("dolly", None, tmp_path, tok) == ("dolly", "--template")
    trained = SimpleNamespace(template="none")  # adapters trained on completions or text (what is read of them)
    assert resolve_template(None, trained, tmp_path, tok)[0] == "none"


def test_system_prompt_and_history(tmp_path, tiny_spm_path):
    tok = load_tokenizer(write_chat_tokenizer(tmp_path / "tok", CHATML))
    system = {"role": "system", "content": "answer in one word"}
    turns = [{"role": "user", "content": "name a river"}, {"role": "assistant", "content": "the nile"}]
    session = ChatSession(_model(512), tok, "chat", system=system["content"], messages=list(turns))
    ids, dropped = session.prompt_ids("what is blue?")
    assert dropped == 0
    assert ids == generation_prompt_ids(tok, [system, *turns, {"role": "user", "content": "what is blue?"}])
    short = len(generation_prompt_ids(tok, [system, {"role": "user", "content": "what is blue?"}]))
    session = ChatSession(_model(short + 1), tok, "chat", system=system["content"], messages=list(turns))
    ids, dropped = session.prompt_ids("what is blue?")
    assert dropped == 1 and len(ids) == short and session.messages == []  # the system prompt stays
    with pytest.raises(UserError, match="system prompt needs the model's chat template"):
        ChatSession(_model(512), load_tokenizer(tiny_spm_path), "dolly", system="x").prompt_ids("hi")
