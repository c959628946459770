"""Labels token by token: prompt masked, response + EOS learned, the ids of the whole text, truncation.

References: the sentencepiece processor called directly (not our wrapper), Mistral's own ``mistral-common``
encoder for the ``mistral`` template, and hand-written token lists.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm

from mlx_qlora.data import (
    CROSS_ENTROPY_IGNORE_INDEX as IGNORE,
    Record,
    encode_chat,
    format_prompt,
    format_response,
    load_tokenizer,
    tokenize_example,
    tokenize_prompt_response,
    tokenize_records,
)
from mlx_qlora.data.prepare import fit_example

CASES = [
    ("What is the capital of France?", "", "Paris is the capital of France."),
    ("Summarize the passage.", "The river runs north. It floods in spring.", "A northward river that floods."),
    ("Translate to French: naive cafe", "", "café naïve, 東京 and 🙂 — ok"),
    ("Explain   spacing", "  padded context\twith tabs  ", "line one\n\nline two\n  indented"),
    ("Braces {like} these", "", "{response} with braces"),
    ("Leading space answer", "", " starts with a space"),
    ("Newline answer", "", "\nstarts with a newline"),
]


@pytest.fixture(scope="module", params=["mistral", "tiny"])
def tokenizers(request, mistral_tokenizer_path, tiny_spm_path):
    path = mistral_tokenizer_path if request.param == "mistral" else tiny_spm_path
    return load_tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_dolly_labels_token_by_token_mistral(mistral_tokenizer_path):
    tok = load_tokenizer(mistral_tokenizer_path)
    ex = tokenize_example(tok, "dolly", "What is the capital of France?", "", "Paris.")
    pieces = [tok.id_to_piece(i) for i in ex.input_ids]
    expected = [
        ("<s>", False), ("▁###", False), ("▁Inst", False), ("ruction", False), (":", False), ("<0x0A>", False),
        ("What", False), ("▁is", False), ("▁the", False), ("▁capital", False), ("▁of", False),
        ("▁France", False),
        ("?", False), ("<0x0A>", False), ("<0x0A>", False), ("###", False), ("▁Response", False), (":", False),
        ("<0x0A>", False), ("Par", True), ("is", True), (".", True), ("</s>", True),
    ]
    assert pieces == [p for p, _ in expected]
    for token, label, (_, learned) in zip(ex.input_ids, ex.labels, expected):
        assert label == (token if learned else IGNORE)


def test_mistral_template_token_by_token(mistral_tokenizer_path):
    tok = load_tokenizer(mistral_tokenizer_path)
    ex = tokenize_example(tok, "mistral", "hi there", "", "Paris is nice")
    pieces = [tok.id_to_piece(i) for i in ex.input_ids]
    assert pieces == ["<s>", "▁[", "INST", "]", "▁hi", "▁there", "▁[", "/", "INST", "]",
                      "▁Paris", "▁is", "▁nice", "</s>"]
    assert ex.labels[:10] == [IGNORE] * 10
    assert ex.labels[10:] == ex.input_ids[10:]


@pytest.mark.parametrize("template", ["dolly", "alpaca", "mistral"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prompt_masked_response_and_eos_learned(tokenizers, template, case):
    tok, sp = tokenizers
    instruction, context, response = CASES[case]
    ex = tokenize_example(tok, template, instruction, context, response)
    prompt = format_prompt(template, instruction, context)
    text = prompt + format_response(template, response)
    # The ids are the whole formatted text tokenized in one go, between BOS and EOS.
    assert ex.input_ids == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    # With the shipped templates the prompt ends on a token boundary: its own ids are a prefix.
    prompt_ids = sp.encode(prompt)
    n_masked = 1 + len(prompt_ids)
    assert ex.input_ids[1:n_masked] == prompt_ids
    assert ex.labels[:n_masked] == [IGNORE] * n_masked
    assert ex.labels[n_masked:] == ex.input_ids[n_masked:]
    assert ex.labels[-1] == sp.eos_id()
    assert n_masked < len(ex.input_ids) - 1  # at least one response token besides EOS
    if tok.vocab_size == 32000:  # identity normalisation: decoding the learned ids gives the response back
        learned = ex.input_ids[n_masked:-1]
        assert sp.decode(prompt_ids + learned) == sp.decode(sp.encode(text))
        if not response[0].isspace() and template != "mistral":
            assert sp.decode(learned) == response


@pytest.mark.parametrize("context", ["", "Some context about rivers."])
def test_mistral_template_equals_mistral_common(mistral_tokenizer_path, context):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.v1().instruct_tokenizer
    tok = load_tokenizer(mistral_tokenizer_path)
    instruction, response = "Name a blue thing.", "The sky, on a clear day — très bleu."
    user = instruction + ("\n\n" + context if context else "")
    expected = reference.encode_instruct(
        InstructRequest(messages=[UserMessage(content=user), AssistantMessage(content=response)])
    ).tokens
    ex = tokenize_example(tok, "mistral", instruction, context, response)
    assert ex.input_ids == expected

    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name two rivers."},
    ]
    ids, labels = encode_chat(tok, "mistral", messages)
    expected = reference.encode_instruct(
        InstructRequest(messages=[UserMessage(content="hi"), AssistantMessage(content="Hello! How can I help?"),
                                  UserMessage(content="Name two rivers.")])
    ).tokens
    assert ids == expected
    learned = [t for t in labels if t != IGNORE]
    assert learned == tok.encode("Hello! How can I help?") + [tok.eos_id]  # "▁Hello": the lead space merged


def test_merge_across_boundary_is_learned(tokenizers):
    """A prompt ending in a space: sentencepiece merges the space into the first response token."""
    tok, sp = tokenizers
    prompt, response = "Answer: ", "Paris"
    ids, n_prompt = tokenize_prompt_response(tok, prompt, response)
    assert ids == sp.encode(prompt + response)
    full_pieces = sp.encode(prompt + response, out_type=str)
    assert full_pieces[n_prompt:][0].startswith("▁")  # the merged "▁Paris..." token is learned
    assert sp.encode(prompt)[:n_prompt] == ids[:n_prompt]
    assert sp.decode(ids[:n_prompt]) == "Answer:" and sp.decode(ids[n_prompt:]) == "Paris"


def test_truncates_context_first(tokenizers):
    tok, sp = tokenizers
    context = " ".join(f"word{i} the river" for i in range(200))
    full = tokenize_example(tok, "dolly", "Summarize.", context, "A river of words.")
    max_len = len(full) // 2
    ex = tokenize_example(tok, "dolly", "Summarize.", context, "A river of words.", max_seq_len=max_len)
    assert ex.truncated_context and not ex.truncated_response
    assert len(ex) <= max_len
    kept = context[: ex.context_chars]
    assert 0 < len(kept) < len(context) and context.startswith(kept)
    # The ids are those of the truncated text tokenized in one go; response and EOS are all kept.
    text = format_prompt("dolly", "Summarize.", kept) + "A river of words."
    assert ex.input_ids == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    learned_full = [t for t in full.labels if t != IGNORE]
    assert [t for t in ex.labels if t != IGNORE] == learned_full
    # As much context as possible is kept: one more token of it would not fit.
    assert len(ex) > max_len - 8


def test_truncates_response_keeping_minimum(tokenizers):
    tok, sp = tokenizers
    response = " ".join(["the quick brown fox"] * 60)
    prompt = format_prompt("dolly", "Write.")
    n_prompt = 1 + len(sp.encode(prompt))
    max_len = n_prompt + 20
    ex = tokenize_example(tok, "dolly", "Write.", "", response, max_seq_len=max_len, min_response_tokens=16)
    assert ex.truncated_response and not ex.truncated_context
    assert len(ex) == max_len
    full = [sp.bos_id()] + sp.encode(prompt + response)
    assert ex.input_ids == full[:max_len]  # a prefix of the whole text's ids, no EOS
    assert sp.eos_id() not in ex.input_ids
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt and ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    # Fewer than min_response_tokens of room: dropped.
    short = n_prompt + 15
    assert tokenize_example(tok, "dolly", "Write.", "", response, max_seq_len=short, min_response_tokens=16) is None


def test_context_removed_then_response_cut(tokenizers):
    tok, sp = tokenizers
    response = " ".join(["blue green river"] * 80)
    ex = tokenize_example(tok, "dolly", "Describe.", "short context here", response, max_seq_len=64)
    assert ex.truncated_context and ex.truncated_response and ex.context_chars == 0
    assert ex.input_ids == ([sp.bos_id()] + sp.encode(format_prompt("dolly", "Describe.") + response))[:64]


def test_instruction_too_long_is_dropped(tokenizers):
    tok, _ = tokenizers
    assert tokenize_example(tok, "dolly", "word " * 200, "", "short", max_seq_len=64) is None


def test_batch_path_equals_one_by_one(tokenizers):
    tok, _ = tokenizers
    records = [Record(i, c, r) for i, c, r in CASES]
    records += [Record("Summarize.", "river " * 150, "Rivers."), Record("Write.", "", "fox " * 150),
                Record("x " * 100, "", "y")]
    batch = tokenize_records(tok, "dolly", records, max_seq_len=96, min_response_tokens=8)
    single = [fit_example(tok, "dolly", r, 96, 8) for r in records]
    assert [b is None for b in batch] == [s is None for s in single] == [False] * 9 + [True]
    for b, s in zip(batch, single):
        if b is not None:
            assert (b.input_ids, b.labels, b.truncated_context, b.truncated_response) == (
                s.input_ids, s.labels, s.truncated_context, s.truncated_response)
