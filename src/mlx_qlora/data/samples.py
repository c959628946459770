"""Conversations, completions and plain text -> examples (instruction records: ``prepare.tokenize_records``).

- A conversation: ``conversation.encode_conversation`` (learned assistant turns, truncation by whole turns).
- A completion: ``[BOS] + tokenize(prompt + completion) + [EOS]``, raw text with no template; the prompt is
  masked by the boundary rule of instructions (``prepare.common_prefix_length``), the completion and EOS are
  learned. Too long: the completion is cut without EOS while ``min_response_tokens`` of it remain
  (``truncated_response``), else the example is dropped.
- Text: ``[BOS] + tokenize(text) + [EOS]``, every token learned; too long: cut at ``max_seq_len`` without
  EOS (``truncated_response``).

A record the template cannot render raises ``UserError`` naming its file and line, or with ``skip_bad`` is
skipped and listed.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import UserError
from .constants import CROSS_ENTROPY_IGNORE_INDEX
from .conversation import encode_conversation
from .formats import Completion, Conversation, Text


def encode_completion(tokenizer, record: Completion, max_seq_len: int, min_response_tokens: int):
    """The example of one prompt/completion pair (``prepare.Example``), or None when it cannot fit."""
    from .prepare import Example, _assemble, tokenize_prompt_response

    ids, n_prompt = tokenize_prompt_response(tokenizer, record.prompt, record.completion)
    n_bos = 1 if tokenizer.bos_id is not None else 0
    if n_bos + len(ids) + 1 <= max_seq_len:
        return Example(*_assemble(tokenizer, ids, n_prompt, add_eos=True))
    room = max_seq_len - n_bos - n_prompt
    if room < min_response_tokens:
        return None
    return Example(*_assemble(tokenizer, ids[: n_prompt + room], n_prompt, add_eos=False), truncated_response=True)


def encode_text(tokenizer, record: Text, max_seq_len: int):
    """The example of one text: every token learned (BOS excepted); cut at ``max_seq_len`` without EOS."""
    from .prepare import Example

    ids = tokenizer.encode(record.text, add_bos=True, add_eos=True)
    truncated = len(ids) > max_seq_len
    ids = ids[:max_seq_len]
    labels = list(ids)
    if tokenizer.bos_id is not None:
        labels[0] = CROSS_ENTROPY_IGNORE_INDEX
    return Example(ids, labels, truncated_response=truncated)


def tokenize_samples(tokenizer, template_name: str, records: Sequence, where: Sequence[str], learn: str,
                     max_seq_len: int, min_response_tokens: int, skip_bad: bool = False,
                     progress: bool = False) -> tuple[list[Optional[object]], list[str]]:
    """``(examples, skipped)``: the example of every record (None: dropped as too long, or skipped as bad)
    and one ``"file, line n: why"`` line per skipped record."""
    from tqdm import tqdm

    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no EOS token; it cannot mark where a response ends")
    examples, skipped = [], []
    for record, place in tqdm(list(zip(records, where)), desc="tokenizing", unit="ex", disable=not progress,
                              leave=False):
        try:
            if isinstance(record, Conversation):
                example = encode_conversation(tokenizer, template_name, record.messages, record.tools, learn,
                                              max_seq_len, min_response_tokens)
            elif isinstance(record, Completion):
                example = encode_completion(tokenizer, record, max_seq_len, min_response_tokens)
            elif isinstance(record, Text):
                example = encode_text(tokenizer, record, max_seq_len)
            else:
                raise TypeError(f"not a conversation, completion or text: {type(record).__name__}")
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{place}: {e}") from None
            skipped.append(f"{place}: {e}")
            example = None
        examples.append(example)
    return examples, skipped
