"""Evaluation on conversation data: the prompt is the conversation up to the last assistant turn with the
generation prompt (what generation is given), the reference is that turn's text."""

from __future__ import annotations

import numpy as np
import pytest
from support import write_chat_tokenizer

from mlx_qlora.data import load_tokenizer
from mlx_qlora.data.conversation import encode_conversation, generation_prompt_ids
from mlx_qlora.generate.evaluate import split_example

CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "answer in one word"},
            {"role": "user", "content": "name a river"}, {"role": "assistant", "content": "the nile"},
            {"role": "user", "content": "what is blue?"}, {"role": "assistant", "content": "the sky"}]


@pytest.mark.parametrize("learn", ["assistant", "last"])
def test_last_assistant_turn_is_the_reference(tmp_path, learn):
    tok = load_tokenizer(write_chat_tokenizer(tmp_path / "tok", CHATML))
    ex = encode_conversation(tok, "chat", MESSAGES, learn=learn)
    prompt, reference = split_example(np.array(ex.input_ids), np.array(ex.labels), tok.eos_id)
    assert prompt == generation_prompt_ids(tok, MESSAGES[:-1])
    assert tok.decode(reference) == "the sky" and tok.eos_id not in reference
