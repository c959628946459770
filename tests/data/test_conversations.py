"""Conversations, completions and text: formats detected from the columns, learned tokens checked token by
token against transformers (``return_assistant_tokens_mask`` for templates with generation blocks; the prefix
rule computed from transformers' own renderings and offsets elsewhere) and mistral-common, truncation by
whole turns, bad records, and batching of every format."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support import reference_prefix_mask, write_chat_tokenizer

from mlx_qlora.config import DataConfig
from mlx_qlora.data import BatchIterator, PreparedDataset, load_records, load_tokenizer, prepare_dataset
from mlx_qlora.data.conversation import encode_conversation, render_with_spans
from mlx_qlora.data.formats import Completion, Conversation, Text
from mlx_qlora.errors import UserError

IGNORE = -100

# ChatML with a default system prompt, tools listed in the system turn, tool calls as JSON, and the learned
# text marked with {% generation %} (content and <|im_end|>; the newline after it is not learned).
CHATML_MARKED = (
    "{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{%- else %}{% set system = 'You are a careful assistant.' %}{%- endif %}"
    "{{ '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{ '\\n\\nTools:' }}{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] }}"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + call.function | tojson + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- elif message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_PLAIN = CHATML_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Llama-2 style: contents stripped, spaces added around them, no generation prompt, refuses unknown roles.
WHITESPACE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '<<SYS>> ' + message['content'] | trim + ' <</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token + '\\n' }}"
    "{%- else %}{{ raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
# Plain ChatML that knows nothing of tools (tool calls vanish from the text).
NO_TOOLS = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Rewrites earlier answers once a later turn follows: the prefix rule cannot hold.
REWRITES = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' and not loop.last %}{{ '[earlier]' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOOLS = ({"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}},)
CONVERSATIONS = {
    "one turn, default system": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "system and three turns": [
        {"role": "system", "content": "answer in one word"},
        {"role": "user", "content": "name a river"}, {"role": "assistant", "content": "the nile"},
        {"role": "user", "content": "  what is blue?  "}, {"role": "assistant", "content": " the sky \n"},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "bye"}],
    "tool call": [
        {"role": "user", "content": "what is the weather in paris"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny today"}],
}


def _tools(name):
    return TOOLS if name == "tool call" else None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {name: write_chat_tokenizer(root / name, source) for name, source in
            (("marked", CHATML_MARKED), ("plain", CHATML_PLAIN), ("whitespace", WHITESPACE), ("rewrites", REWRITES),
                                                   ("no_tools", NO_TOOLS))}


def _hf(folder):
    import transformers

    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


def _mask(labels):
    return [int(label != IGNORE) for label in labels]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_generation_blocks_equal_transformers_assistant_mask(folders, name):
    messages, tools = CONVERSATIONS[name], _tools(name)
    hf = _hf(folders["marked"])
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
    ex = encode_conversation(load_tokenizer(folders["marked"]), "chat", messages, tools)
    assert ex.input_ids == list(theirs["input_ids"]) and sum(theirs["assistant_masks"]) > 0
    assert _mask(ex.labels) == list(theirs["assistant_masks"])
    assert [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE] == \
        [t for t, m in zip(ex.input_ids, theirs["assistant_masks"]) if m]


@pytest.mark.parametrize("template", ["plain", "whitespace"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prefix_rule_equals_reference(folders, template, name):
    messages, tools = CONVERSATIONS[name], _tools(name)
    if template == "whitespace" and name == "tool call":
        with pytest.raises(UserError, match="Only system, user and assistant roles"):
            encode_conversation(load_tokenizer(folders[template]), "chat", messages, tools)
        return
    ids, mask = reference_prefix_mask(_hf(folders[template]), messages, tools)
    tok = load_tokenizer(folders[template])
    ex = encode_conversation(tok, "chat", messages, tools)
    assert ex.input_ids == ids and _mask(ex.labels) == mask
    # every assistant turn is learned through its end-of-turn token, and nothing of the other turns is
    learned = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant" and m["content"].strip()]
    assert all(answer in learned for answer in answers)
    assert ex.labels.count(tok.eos_id) == sum(m["role"] == "assistant" for m in messages)
    assert all(m["content"].strip() not in learned for m in messages if m["role"] in ("user", "system"))


def test_whitespace_template_spans(folders):
    """Stripped contents, added spaces: the learned text is exactly ' ' + stripped answer + ' ' + EOS + '\\n'."""
    tok = load_tokenizer(folders["whitespace"])
    messages = CONVERSATIONS["system and three turns"]
    rendered = render_with_spans(tok, messages)
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        " the nile <|im_end|>\n", " the sky <|im_end|>\n", " bye <|im_end|>\n"]
    assert rendered.rule == "prefix"


def test_learn_last_and_all(folders):
    tok = load_tokenizer(folders["marked"])
    messages = CONVERSATIONS["system and three turns"]
    every = encode_conversation(tok, "chat", messages)
    last = encode_conversation(tok, "chat", messages, learn="last")
    everything = encode_conversation(tok, "chat", messages, learn="all")
    assert every.input_ids == last.input_ids == everything.input_ids
    learned_every = [i for i, label in enumerate(every.labels) if label != IGNORE]
    learned_last = [i for i, label in enumerate(last.labels) if label != IGNORE]
    assert tok.decode([every.input_ids[i] for i in learned_last]) == "bye"
    assert set(learned_last) < set(learned_every)
    assert learned_last == learned_every[-len(learned_last):]
    assert everything.labels == everything.input_ids  # no BOS here: every token


def test_template_that_rewrites_earlier_turns_is_refused(folders):
    tok = load_tokenizer(folders["rewrites"])
    with pytest.raises(UserError, match="learned span of message 2 cannot be found"):
        encode_conversation(tok, "chat", CONVERSATIONS["system and three turns"])


def test_sharegpt_equals_messages(tmp_path, folders):
    messages = CONVERSATIONS["system and three turns"]
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": role[m["role"]], "value": m["content"]} for m in messages]
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversations": sharegpt}) + "\n")
    a, b = load_records(tmp_path / "a.jsonl"), load_records(tmp_path / "b.jsonl")
    assert (a.format, b.format) == ("messages", "sharegpt")
    assert a.records == b.records == [Conversation(tuple(messages))]
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": sharegpt[1:], "system": messages[0]["content"]}))
    assert load_records(tmp_path / "c.jsonl").records == a.records  # a separate system column


def test_formats_detected_and_overridden(tmp_path):
    rows = {"completion": {"prompt": "2 + 2 =", "completion": " 4", "category": "math"},
            "text": {"text": "Once upon a time."},
            "instruction": {"instruction": "Add.", "response": "4"}}
    for name, row in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    assert load_records(tmp_path / "completion.jsonl").records == [Completion("2 + 2 =", " 4", "math")]
    assert load_records(tmp_path / "text.jsonl").records == [Text("Once upon a time.")]
    assert load_records(tmp_path / "instruction.jsonl").format == "instruction"
    with pytest.raises(UserError, match=r"line 1: format 'messages' needs the column\(s\) 'messages'"):
        load_records(tmp_path / "text.jsonl", fmt="messages")
    csv = tmp_path / "c.csv"
    csv.write_text('messages,category\n"' + json.dumps(CONVERSATIONS["tool call"]).replace('"', '""') + '",weather\n')
    assert load_records(csv).records == [Conversation(tuple(CONVERSATIONS["tool call"]), None, "weather")]
    parquet = tmp_path / "c.parquet"
    import datasets

    datasets.Dataset.from_list([{"messages": CONVERSATIONS["one turn, default system"]}]).to_parquet(str(parquet))
    assert load_records(parquet).records == [Conversation(tuple(CONVERSATIONS["one turn, default system"]))]


def test_completion_and_text_labels(tmp_path, tiny_spm_path):
    tok = load_tokenizer(tiny_spm_path)
    from mlx_qlora.data.samples import encode_completion, encode_text

    ex = encode_completion(tok, Completion("what is the", " weather in paris"), 64, 4)
    full = tok.encode("what is the weather in paris")
    n_prompt = len(tok.encode("what is the"))
    assert ex.input_ids == [tok.bos_id] + full + [tok.eos_id]
    assert ex.labels == [IGNORE] * (1 + n_prompt) + full[n_prompt:] + [tok.eos_id]
    ex = encode_text(tok, Text("one two three four"), 64)
    assert ex.labels == [IGNORE] + ex.input_ids[1:] and ex.input_ids[-1] == tok.eos_id
    cut = encode_text(tok, Text("one two three four " * 20), 16)
    assert len(cut) == 16 and cut.truncated_response and tok.eos_id not in cut.input_ids


def test_mistral_chat_template_equals_mistral_common(tmp_path, mistral_tokenizer_path):
    """A Mistral-style chat template on the real sentencepiece model: ids equal mistral-common's turn for turn,
    the answers and their </s> are learned."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    template = ("{{ bos_token }}{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
    folder = tmp_path / "mistral"
    folder.mkdir()
    shutil.copy(mistral_tokenizer_path, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(folder)
    turns = [("hi", "Hello! How can I help?"), ("Name two rivers.", "The Nile and the Amazon — très longs.")]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ex = encode_conversation(tok, "chat", messages)
    reference = MistralTokenizer.v1().instruct_tokenizer
    history = [UserMessage(content="hi"), AssistantMessage(content=turns[0][1]), UserMessage(content=turns[1][0])]
    prompt = reference.encode_instruct(InstructRequest(messages=history)).tokens
    answer = tok.encode(turns[1][1]) + [tok.eos_id]
    assert ex.input_ids == prompt + answer
    learned = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert learned == tok.encode(turns[0][1]) + [tok.eos_id] + answer
    with pytest.raises(UserError, match="roles must alternate"):
        encode_conversation(tok, "chat", [messages[0], messages[0], messages[1]])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_truncation_keeps_whole_turns_from_the_start(tmp_path, folders):
    tok = load_tokenizer(folders["marked"])
    messages = CONVERSATIONS["system and three turns"]
    full = encode_conversation(tok, "chat", messages)
    two_turns = encode_conversation(tok, "chat", messages[:5])
    ex = encode_conversation(tok, "chat", messages, max_seq_len=len(full) - 1)
    assert ex.truncated_turns and not ex.cut_turn
    assert ex.input_ids == two_turns.input_ids and ex.labels == two_turns.labels  # system kept, turn 3 dropped
    one_turn = encode_conversation(tok, "chat", messages[:3])
    start = one_turn.labels.index(next(label for label in one_turn.labels if label != IGNORE))
    cut = encode_conversation(tok, "chat", messages, max_seq_len=start + 2, min_response_tokens=2)
    assert cut.cut_turn and cut.input_ids == one_turn.input_ids[: start + 2]
    assert cut.labels[start:] == one_turn.input_ids[start : start + 2]
    assert encode_conversation(tok, "chat", messages, max_seq_len=start + 1, min_response_tokens=2) is None
    # prepare_dataset counts them
    source = _write(tmp_path / "d.jsonl", [{"messages": messages}] * 3 + [{"messages": messages[:3]}])
    meta = prepare_dataset(source, tok, tmp_path / "out", DataConfig(max_seq_len=len(full) - 1, val_fraction=0.25))
    assert meta["counts"]["truncated_turns"] == 3 and meta["counts"]["cut_turns"] == 0
    assert meta["template"] == "chat" and meta["format"] == "messages"


BAD = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                     "message 0: unknown role 'robot'"),
    "template refuses": ({"messages": [{"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "x"}]},
                         "Only system, user and assistant roles are supported"),
    "tool call not rendered": ({"messages": CONVERSATIONS["tool call"][:2] + [{"role": "assistant", "content": "x"}]},
                               "does not render its tool call 'get_weather'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversation_one_line_exit_2_nothing_written(tmp_path, folders, case, capsys):
    from mlx_qlora.cli.prepare import main

    row, message = BAD[case]
    good = {"messages": CONVERSATIONS["one turn, default system"]}
    source = _write(tmp_path / "d.jsonl", [good, good, row, good])
    tokenizer = folders["whitespace"] if case != "tool call not rendered" else folders["no_tools"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", str(source), "--tokenizer", str(tokenizer), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {source}, line 3: ") and message in err[0], err
    assert not out.exists()
    main(["--dataset", str(source), "--tokenizer", str(tokenizer), "--out", str(out), "--no-progress",
          "--skip-bad", "--val-fraction", "0.34"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["skipped_bad"] == 1 and meta["counts"]["examples"] == 3
    assert meta["skipped_examples"][0].startswith(f"{source}, line 3: ")


@pytest.mark.parametrize("fmt", ["messages", "completion", "text"])
def test_packing_and_bucketing_every_format(tmp_path, folders, fmt):
    """Every example's learned tokens reach the batches exactly once per epoch, packed or bucketed."""
    rng = np.random.default_rng(0)
    words = "hi hello the nile blue sky paris sunny today bye".split()

    def sentence():
        return " ".join(rng.choice(words, rng.integers(2, 9)))

    rows = []
    for _ in range(24):
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": sentence()},
                                      {"role": "assistant", "content": sentence()},
                                      {"role": "user", "content": sentence()},
                                      {"role": "assistant", "content": sentence()}]})
        elif fmt == "completion":
            rows.append({"prompt": sentence(), "completion": " " + sentence()})
        else:
            rows.append({"text": sentence()})
    out = tmp_path / "out"
    prepare_dataset(_write(tmp_path / "d.jsonl", rows), load_tokenizer(folders["marked"]), out,
                    DataConfig(max_seq_len=128, val_fraction=0.1))
    data = PreparedDataset(out, "train")
    expected = sorted(int(t) for i in range(len(data)) for t in data[i]["labels"] if t != IGNORE)
    for packing in (False, True):
        batches = BatchIterator(data, batch_size=4, seed=0, packing=packing, max_seq_len=128, repeat=False)
        got = sorted(int(t) for batch in batches for t in np.asarray(batch["labels"]).ravel() if t != IGNORE)
        assert got == expected, packing


def test_named_template_conversations_and_tools_column(tmp_path, tiny_spm_path, folders):
    """A named template takes alternating user/assistant turns (the ids of encode_chat), refuses a system
    turn; without a chat template, conversations need one named; a tools column reaches the template."""
    from mlx_qlora.data import encode_chat

    tok = load_tokenizer(tiny_spm_path)
    messages = CONVERSATIONS["system and three turns"]
    ex = encode_conversation(tok, "mistral", messages[1:])
    assert (ex.input_ids, ex.labels) == encode_chat(tok, "mistral", messages[1:])
    with pytest.raises(UserError, match="template 'mistral' cannot render 'system' messages; use --template chat"):
        encode_conversation(tok, "mistral", messages)
    source = _write(tmp_path / "d.jsonl", [{"messages": messages[1:]}] * 4)
    with pytest.raises(UserError, match="conversations need a chat template"):
        prepare_dataset(source, tok, tmp_path / "out", DataConfig())
    meta = prepare_dataset(source, tok, tmp_path / "out", DataConfig(template="dolly", learn="last"))
    assert (meta["template"], meta["learn"], meta["format"]) == ("dolly", "last", "messages")
    row = {"messages": CONVERSATIONS["tool call"], "tools": json.dumps(TOOLS)}
    record = load_records(_write(tmp_path / "t.jsonl", [row])).records[0]
    assert record.tools == TOOLS
    text = render_with_spans(load_tokenizer(folders["marked"]), record.messages, record.tools).text
    assert '"name": "get_weather", "description": "weather in a city"' in text
