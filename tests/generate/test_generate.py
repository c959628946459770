"""Generation: greedy parity with transformers, batching, streaming text, stop strings, the REPL, adapters
attached at run time (against PEFT), and the errors users meet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.chat import ChatSession
from mlx_qlora.generate.generator import TextStream, generate, generate_batch, generate_stream
from mlx_qlora.generate.loading import attach_adapters, load_for_inference, resolve_template
from mlx_qlora.generate.sampling import SamplerConfig
from mlx_qlora.model import ModelArgs, load_model
from support import random_adapters, write_adapters

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def model_dir(tiny_hf_checkpoint, tiny_spm_path, tmp_path_factory) -> Path:
    """The tiny transformers checkpoint with a 320-piece tokenizer beside it (vocabularies match)."""
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    shutil.copytree(tiny_hf_checkpoint, folder)
    shutil.copy(tiny_spm_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def model(tiny_hf_checkpoint):
    return load_model(tiny_hf_checkpoint)


@pytest.fixture(scope="module")
def reference(tiny_hf_checkpoint):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_hf_checkpoint, attn_implementation="eager", dtype=torch.float32).eval()


def _hf_greedy(reference, ids, n, eos=None):
    import torch

    out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ---- greedy parity and batching ----------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len, chunk", [(5, 512), (21, 4), (21, 512)])
def test_greedy_matches_transformers_past_the_sliding_window(model, reference, prompt_len, chunk):
    """Window 16: 40 new tokens after prompts shorter and longer than the window, prompt in chunks or not."""
    ids = np.random.default_rng(prompt_len).integers(3, 320, size=prompt_len).tolist()
    expected = _hf_greedy(reference, ids, 40)
    result = generate(model, None, ids, max_tokens=40, eos_ids=set(), prefill_chunk=chunk)
    assert result.tokens == expected
    assert result.finish_reason == "length"
    assert model.make_cache()[0].max_size == 16  # the cache really is the rotating window


@pytest.mark.parametrize("eval_every", [1, 2, 5])
def test_prompt_pass_in_groups_of_layers_is_the_same(tiny_model, eval_every):
    """The prompt pass evaluated every few layers (``MLX_QLORA_PREFILL_EVAL_LAYERS``) computes exactly what
    one queued pass does, the cache included: 5 layers in groups of 1 and 2 (a group waited for while the
    next is queued) and of 5 (one group)."""
    model = tiny_model(seed=0, vocab_size=96, intermediate_size=96, num_hidden_layers=5, sliding_window=16,
                       max_position_embeddings=512)
    model.eval()
    ids = mx.array(np.random.default_rng(3).integers(3, 96, size=(2, 21)))
    caches = [model.make_cache(), model.make_cache()]
    whole = model.hidden_states(ids, cache=caches[0])
    grouped = model.hidden_states(ids, cache=caches[1], eval_every=eval_every)
    assert mx.array_equal(grouped, whole)
    for a, b in zip(*caches):
        assert a.offset == b.offset and all(mx.array_equal(x, y) for x, y in zip(a.state, b.state))


@pytest.mark.parametrize("eval_layers", [0, 1])
def test_generation_with_the_prompt_pass_in_groups_equals_transformers(model, reference, monkeypatch, eval_layers):
    """Greedy generation equals transformers' with the prompt pass a layer at a time (the default) and
    queued at once (``MLX_QLORA_PREFILL_EVAL_LAYERS=0``)."""
    from mlx_qlora import settings

    prompt = np.random.default_rng(4).integers(3, 320, size=21).tolist()
    with settings.override(prefill_eval_layers=eval_layers):
        assert generate(model, None, prompt, max_tokens=12, eos_ids=set()).tokens == _hf_greedy(reference, prompt, 12)


def test_greedy_stops_at_eos_like_transformers(model, reference):
    ids = np.random.default_rng(7).integers(3, 320, size=9).tolist()
    free = _hf_greedy(reference, ids, 30)
    eos = free[12]  # pretend this id is EOS: both stop where it first appears
    expected = _hf_greedy(reference, ids, 30, eos=eos)
    result = generate(model, None, ids, max_tokens=30, eos_ids={eos})
    assert expected[-1] == eos
    assert result.tokens == expected[:-1]  # our tokens leave out the EOS that ended the answer
    assert result.finish_reason == "eos"


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_left_padded_generation_equals_one_by_one(model, penalty):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (3, 12, 26, 7)]
    sampler = SamplerConfig(repetition_penalty=penalty)
    alone = [generate(model, None, p, max_tokens=30, sampler=sampler, eos_ids=set()) for p in prompts]
    eos = alone[1].tokens[4]  # row 1 stops early; the others go on (or stop where this id appears)
    alone = [generate(model, None, p, max_tokens=30, sampler=sampler, eos_ids={eos}) for p in prompts]
    batched = generate_batch(model, None, prompts, max_tokens=30, sampler=sampler, eos_ids={eos}, prefill_chunk=8)
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
    assert {r.finish_reason for r in alone} == {"eos", "length"}


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_compiled_batched_generation_equals_one_by_one(model, penalty, monkeypatch):
    """Prompts within the window (16): the batched steps replay the compiled graph over static caches, the
    left padding a mask over the slots, and the ring of the window wraps around during the 30 steps; the
    tokens equal generating each prompt alone (and the operation-by-operation batch)."""
    from mlx_qlora.generate import decode_step

    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (3, 12, 7, 9)]
    sampler = SamplerConfig(repetition_penalty=penalty)
    alone = [generate(model, None, p, max_tokens=30, sampler=sampler, eos_ids=set()) for p in prompts]
    rows = []
    step = decode_step.CompiledDecoder.step
    monkeypatch.setattr(decode_step.CompiledDecoder, "step", lambda self, state, tokens, *a: rows.append(bool(a))
                        or step(self, state, tokens, *a))
    batched = generate_batch(model, None, prompts, max_tokens=30, sampler=sampler, eos_ids=set(), prefill_chunk=8)
    assert rows and all(rows) and len(rows) == 29  # every step after the prompt's: compiled, with the mask
    eager = generate_batch(model, None, prompts, max_tokens=30, sampler=sampler, eos_ids=set(), prefill_chunk=8,
                           compiled=False)
    assert [r.tokens for r in batched] == [r.tokens for r in alone] == [r.tokens for r in eager]


def test_seeded_sampling_is_reproducible(model):
    ids = [1, 50, 60, 70]
    sampler = SamplerConfig(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, None, ids, max_tokens=20, sampler=sampler, seed=5, eos_ids=set()).tokens
    b = generate(model, None, ids, max_tokens=20, sampler=sampler, seed=5, eos_ids=set()).tokens
    c = generate(model, None, ids, max_tokens=20, sampler=sampler, seed=6, eos_ids=set()).tokens
    assert a == b and a != c
    assert a != generate(model, None, ids, max_tokens=20, eos_ids=set()).tokens


def test_generation_stops_at_the_context(model):
    """max_position_embeddings 256: a 250-token prompt leaves room for 7 tokens (the last is never fed)."""
    ids = np.random.default_rng(3).integers(3, 320, size=250).tolist()
    result = generate(model, None, ids, max_tokens=50, eos_ids=set())
    assert len(result.tokens) == 7 and result.finish_reason == "length"


def test_prompt_longer_than_the_context_is_a_user_error(model):
    with pytest.raises(UserError, match=r"prompt has 257 tokens, more than the model's context of 256"):
        generate(model, None, [5] * 257, max_tokens=4)
    with pytest.raises(UserError, match=r"prompt 1 has 300 tokens"):
        generate_batch(model, None, [[5] * 10, [5] * 300], max_tokens=4)


# ---- text: streaming and stop strings ----------------------------------------------------------------


class _ByteTokenizer:
    """Decodes ids by joining fixed byte pieces; ids 7 and 8 are the two bytes of "é"."""

    pieces = {0: b"ab", 1: b"c", 2: b" ST", 3: b"OP", 5: b"S", 6: b"x", 7: b"\xc3", 8: b"\xa9"}

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    stream = TextStream(_ByteTokenizer(), stop=["STOP"])
    assert stream.add(0) == "ab"
    assert stream.add(5) == ""  # "S" could start "STOP"
    assert stream.add(6) == "Sx"  # it did not
    assert stream.add(7) == ""  # half a character
    assert stream.add(8) == "\u00e9"
    assert stream.add(2) == " "  # "ST" may start "STOP": held
    assert stream.add(3) == "" and stream.stopped  # "STOP" complete: the text ends before it
    assert stream.text == "abSx\u00e9 "
    assert stream.flush() == ""
    unfinished = TextStream(_ByteTokenizer(), stop=["STOP"])
    unfinished.add(1)
    assert unfinished.add(2) == " " and unfinished.flush() == "ST"  # the end releases what was held


def test_streamed_text_and_stop_strings(model_dir):
    model, tokenizer, _ = load_for_inference(model_dir)
    ids = tokenizer.encode("the quick brown fox", add_bos=True)
    steps = list(generate_stream(model, tokenizer, ids, max_tokens=40, eos_ids=set()))
    text = "".join(s.text for s in steps)
    tokens = [s.token for s in steps]
    assert text == tokenizer.decode(tokens) and len(tokens) == 40
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])
    assert steps[-1].stats.prompt_tokens == len(ids) and steps[-1].stats.generated_tokens == 40
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = generate(model, tokenizer, ids, max_tokens=40, stop=[stop], eos_ids=set())
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert cut.tokens == tokens[: len(cut.tokens)]


# ---- adapters attached at run time -------------------------------------------------------------------


def test_attached_adapters_match_peft(tiny_hf_checkpoint, reference, tmp_path):
    import torch
    from peft import PeftModel

    model = load_model(tiny_hf_checkpoint)
    folder = write_adapters(tmp_path / "run", model.args, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    info = attach_adapters(model, folder)
    assert info.template == "dolly" and info.lora_config.rank == 4
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 24))
    ours = np.array(model(mx.array(ids)))
    peft_model = PeftModel.from_pretrained(reference, folder).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    peft_model.unload()  # leave the shared reference model as it was
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert np.abs(ours - np.array(load_model(tiny_hf_checkpoint)(mx.array(ids)))).max() > 1e-3


def test_checkpoint_folder_and_unfinished_run(model_dir, tmp_path):
    from mlx_qlora.train.checkpoint import save_checkpoint

    args = load_model(model_dir).args
    params, config = random_adapters(args)
    run = tmp_path / "run"
    save_checkpoint(run, 20, adapters=params, lora_config=config, optimizer_state={}, trainer_state={}, config={})
    (run / "run_config.json").write_text(json.dumps({"template": "mistral"}))
    for path in (run, run / "checkpoints" / "step-0000020"):  # run without final adapters, or the checkpoint
        model, tokenizer, info = load_for_inference(model_dir, path)
        assert info.path.name == "step-0000020"
        assert resolve_template(None, info, model_dir) == ("mistral", "the run_config.json of the adapters' run")
    assert "training did not finish" in load_for_inference(model_dir, run)[2].note
    assert resolve_template("alpaca", info, model_dir)[0] == "alpaca"


def test_missing_adapter_files_are_user_errors(model_dir, tmp_path):
    model = load_model(model_dir)
    with pytest.raises(UserError, match=r"adapter folder not found"):
        attach_adapters(model, tmp_path / "nope")
    folder = write_adapters(tmp_path / "run", model.args)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"missing adapter_model\.safetensors"):
        attach_adapters(model, folder)


def test_adapter_for_another_model_shape_is_a_user_error(model_dir, tmp_path):
    model = load_model(model_dir)
    narrow = ModelArgs(**{**vars(model.args), "hidden_size": 32, "head_dim": 8})
    folder = write_adapters(tmp_path / "narrow", narrow)
    model = load_model(model_dir)
    with pytest.raises(UserError, match=r"down_proj\.lora_B has shape \(32, 4\) but this model needs \(64, 4\): "
                                        r"the adapters were made for another model shape \(made for tiny\)"):
        attach_adapters(model, folder)
    assert "lora_A" not in str(model)  # nothing was attached
    deeper = ModelArgs(**{**vars(model.args), "num_hidden_layers": 4})
    folder = write_adapters(tmp_path / "deeper", deeper)
    with pytest.raises(UserError, match=r"adapts layer 3 but the model has 2 layers"):
        attach_adapters(load_model(model_dir), folder)


# ---- chat and the script -----------------------------------------------------------------------------


def test_chat_session_uses_the_training_format(model_dir):
    from mlx_qlora.data.prepare import encode_chat

    model, tokenizer, _ = load_for_inference(model_dir)
    session = ChatSession(model, tokenizer, "mistral", max_tokens=6)
    first = session.reply("hello", lambda s: None)
    ids, _ = session.prompt_ids("and then")
    expected, _ = encode_chat(tokenizer, "mistral", [{"role": "user", "content": "hello"},
                                                     {"role": "assistant", "content": first.text},
                                                     {"role": "user", "content": "and then"}])
    assert ids == expected
    session.reset()
    assert session.prompt_ids("and then")[0] == encode_chat(tokenizer, "mistral",
                                                            [{"role": "user", "content": "and then"}])[0]
    raw = ChatSession(model, tokenizer, None)
    assert raw.prompt_ids("the fox")[0] == [tokenizer.bos_id] + tokenizer.encode("the fox")


def _script(args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_repl_with_piped_input(model_dir, tmp_path):
    folder = write_adapters(tmp_path / "run", load_model(model_dir).args, template="alpaca")
    proc = _script(["--model", model_dir, "--adapter", folder, "--max-tokens", "8"],
                   stdin="hello\nwhat now\n/reset\nhello\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    model, tokenizer, info = load_for_inference(model_dir, folder)
    session = ChatSession(model, tokenizer, "alpaca", max_tokens=8)
    first, second = session.reply("hello", lambda s: None).text, session.reply("what now", lambda s: None).text
    session.reset()
    third = session.reply("hello", lambda s: None).text
    assert first == third
    expected = (f">>> hello\n{first}\n>>> what now\n{second}\n>>> /reset\n(conversation cleared)\n"
                f">>> hello\n{third}\n>>> /quit\n")
    assert proc.stdout.endswith(expected)
    assert "never read" not in proc.stdout
    assert "template: alpaca" in proc.stderr and "generation: 24 tokens" in proc.stderr


def test_one_shot_prompt_prints_speeds(model_dir):
    proc = _script(["--model", model_dir, "--prompt", "the fox", "--no-template", "--max-tokens", "5"])
    assert proc.returncode == 0, proc.stderr
    model, tokenizer, _ = load_for_inference(model_dir)
    ids = tokenizer.encode("the fox", add_bos=True)
    expected = generate(model, tokenizer, ids, max_tokens=5)
    assert proc.stdout == expected.text + "\n"
    assert f"[length] prompt: {len(ids)} tokens, " in proc.stderr
    assert " tokens/s | generation: 5 tokens, " in proc.stderr


def test_script_errors_are_one_line(model_dir, tmp_path):
    proc = _script(["--model", model_dir, "--adapter", tmp_path / "missing", "--prompt", "x"])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "adapter folder not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _script(["--model", model_dir, "--no-template", "--prompt", "fox " * 300])
    assert proc.returncode == 2 and "more than the model's context of 256" in proc.stderr


def test_inference_dtype_follows_the_training_rule(model_dir, tmp_path):
    """``load_for_inference`` resolves the compute dtype as finetune.py does: a float16 checkpoint computes in
    float32 on the CPU (auto), and an explicit dtype is kept."""
    from mlx_qlora.convert import convert_checkpoint
    from mlx_qlora.device import device_type

    if device_type() != "cpu":
        pytest.skip("the auto rule on a GPU keeps the checkpoint's half precision (tests/model/test_compute_dtype.py)")
    half = tmp_path / "half"
    convert_checkpoint(str(model_dir), str(half), bits=4, group_size=None, dtype="float16")
    model, _, _ = load_for_inference(half)
    assert model.model.embed_tokens.weight.dtype == mx.float32
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float32
    model, _, _ = load_for_inference(half, dtype="float16")
    assert model.model.embed_tokens.weight.dtype == mx.float16


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("window", [None, 64])
def test_prompt_cache_runs_only_new_tokens_and_equals_a_fresh_pass(compiled, window):
    """A conversation's next prompt starts with what was fed before (prompt + reply): with a ``PromptCache``
    only the tokens after the common prefix run through the model, and the reply equals a fresh pass
    over the whole prompt token for token (greedy, float32), turn after turn; a prompt that departs early
    reuses only the common prefix; a window that wrapped around reuses nothing."""
    from mlx_qlora.generate.generator import PromptCache
    from support import tiny_model

    model = tiny_model(seed=4, sliding_window=window)
    model.eval()
    rng = np.random.default_rng(7)
    cache, ids = PromptCache(), rng.integers(3, 320, size=9).tolist()
    for turn in range(3):
        run = list(generate_stream(model, None, ids, 12, eos_ids=set(), compiled=compiled, prompt_cache=cache))
        fresh = generate(model, None, ids, max_tokens=12, eos_ids=set(), compiled=compiled)
        assert [s.token for s in run] == fresh.tokens, turn
        stats = run[-1].stats
        expected_reused = 0 if turn == 0 else len(previous)
        assert (stats.reused_tokens, stats.prompt_tokens) == (expected_reused, len(ids) - expected_reused)
        # what the cache holds: every token fed (the last reply token is never fed)
        previous = ids + fresh.tokens[:-1]
        assert cache.tokens == previous and cache.caches[0].offset == len(previous)
        ids = previous + [fresh.tokens[-1]] + rng.integers(3, 320, size=5).tolist()  # the next turn
    departed = ids[:4] + [5] + ids[5:]
    run = list(generate_stream(model, None, departed, 12, eos_ids=set(), compiled=compiled, prompt_cache=cache))
    assert run[-1].stats.reused_tokens == 4
    assert [s.token for s in run] == generate(model, None, departed, max_tokens=12, eos_ids=set()).tokens
    if window is not None:  # 90 positions fed, past the 64-slot window: no cutting back, only going on
        fed = list(cache.tokens)
        assert len(fed) > window
        cut = fed[:-2] + [7]
        run = list(generate_stream(model, None, cut, 3, eos_ids=set(), prompt_cache=cache))
        assert run[-1].stats.reused_tokens == 0
        on = cache.tokens + [7, 8]
        run = list(generate_stream(model, None, on, 5, eos_ids=set(), compiled=compiled, prompt_cache=cache))
        assert run[-1].stats.reused_tokens == len(on) - 2
        assert [s.token for s in run] == generate(model, None, on, max_tokens=5, eos_ids=set()).tokens


def test_a_conversation_traces_its_decoding_graph_again_only_when_the_capacity_doubles():
    """Prompts of 300, 600 and 800 tokens (no common prefix) in one ``PromptCache``: the compiled decoding
    runs on 512, 1024 and again 1024 slots (``grown_capacity``), and each reply equals a fresh pass."""
    from mlx_qlora.generate.generator import PromptCache
    from support import tiny_model

    model = tiny_model(seed=5, max_position_embeddings=1024, sliding_window=None)
    model.eval()
    rng = np.random.default_rng(3)
    cache, capacities = PromptCache(), []
    for length in (300, 600, 800):
        ids = [1] + rng.integers(3, 320, size=length - 1).tolist()
        run = list(generate_stream(model, None, ids, 4, eos_ids=set(), prompt_cache=cache))
        assert [s.token for s in run] == generate(model, None, ids, max_tokens=4, eos_ids=set()).tokens
        capacities.append(cache.capacity)
    assert capacities == [512, 1024, 1024]


def test_chat_session_keeps_the_conversation_cache(model_dir):
    """Turn two of a chat runs only the tokens the first turn did not feed, and replies as a new session
    given the same history does; /reset forgets the cache."""
    model, tokenizer, _ = load_for_inference(model_dir)
    model.args.sliding_window = None  # its 16-token window would wrap in the first turn (tested above)
    session = ChatSession(model, tokenizer, "mistral", max_tokens=6)
    session.reply("hello", lambda s: None)
    second = session.reply("and then", lambda s: None)
    assert second.stats.reused_tokens > 0
    assert second.stats.reused_tokens + second.stats.prompt_tokens == len(session.prompt_cache.tokens) - len(
        second.tokens) + (second.finish_reason != "eos")
    again = ChatSession(model, tokenizer, "mistral", max_tokens=6, messages=session.messages[:2])
    assert again.reply("and then", lambda s: None).text == second.text
    session.reset()
    assert session.prompt_cache.tokens == [] and session.reply("hi", lambda s: None).stats.reused_tokens == 0
