"""Helpers shared by several test modules (``from support import ...``; ``conftest.py`` puts this folder on
``sys.path``): the tiny model's shape and a random model of it (also the ``tiny_model`` fixture), hand-made
LoRA adapters for a model shape, and writing them as a run folder; a LoRA loss and its gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.config import LoRAConfig
from mlx_qlora.lora.adapters import save_adapters
from mlx_qlora.model import ModelArgs

PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "qkv_proj": "self_attn", "gate_up_proj": "mlp"}


def random_adapters(args: ModelArgs, rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=0, std=0.05):
    """Hand-made LoRA weights (A (r, in), B (out, r), both non-zero) for a model of shape ``args``."""
    rng = np.random.default_rng(seed)
    D, F = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    shapes = {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
              "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F), "qkv_proj": (q + 2 * kv, D),
              "gate_up_proj": (2 * F, D)}
    params = {}
    for i in range(args.num_hidden_layers):
        for t in targets:
            out_features, in_features = shapes[t]
            path = f"model.layers.{i}.{PARENTS[t]}.{t}"
            params[f"{path}.lora_A"] = mx.array(rng.normal(0, std, (rank, in_features)).astype(np.float32))
            params[f"{path}.lora_B"] = mx.array(rng.normal(0, std, (out_features, rank)).astype(np.float32))
    return params, LoRAConfig(rank=rank, alpha=2.0 * rank, targets=tuple(targets))


def write_adapters(folder: Path, args: ModelArgs, template="dolly", **kwargs) -> Path:
    params, config = random_adapters(args, **kwargs)
    save_adapters(folder, params, config, "tiny")
    if template:
        (folder / "run_config.json").write_text(json.dumps({"model": "tiny", "template": template}))
    return folder


TINY_MISTRAL = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=16,
    tie_word_embeddings=False,
)


def tiny_args(**overrides):
    """``ModelArgs`` of the tiny Mistral (``TINY_MISTRAL``, the shape of the transformers checkpoints below),
    with ``overrides`` (any ``ModelArgs`` field) replacing its values."""
    from mlx_qlora.model import ModelArgs

    return ModelArgs(**{**TINY_MISTRAL, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """A random ``MistralForCausalLM`` of ``tiny_args(**overrides)``: MLX's default initialisation drawn after
    ``mx.random.seed(seed)``, the parameters evaluated, the module in MLX's default (training) mode."""
    import mlx.core as mx

    from mlx_qlora.model import MistralForCausalLM

    mx.random.seed(seed)
    model = MistralForCausalLM(tiny_args(**overrides))
    mx.eval(model.parameters())
    return model


# The tiny Gemma shape (tests/model/test_gemma.py, tests/test_gemma_e2e.py): 4 layers, window 8, head_dim 16
# with query_pre_attn_scalar 24, so that the attention scale differs from head_dim's.
GEMMA_VOCAB = 320
TINY_GEMMA = dict(vocab_size=GEMMA_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=24, bos_token_id=2, eos_token_id=1,
                  pad_token_id=0)


def save_gemma(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A random transformers Gemma 2 (``model_type`` "gemma2") or Gemma 3 text ("gemma3_text") model of the
    ``TINY_GEMMA`` shape with ``overrides`` saved to ``path``: weights of std 0.1 and random norm weights
    (transformers initialises Gemma norms to 0), so that every feature moves the logits."""
    import torch
    import transformers

    config_class = transformers.Gemma2Config if model_type == "gemma2" else transformers.Gemma3TextConfig
    model_class = transformers.Gemma2ForCausalLM if model_type == "gemma2" else transformers.Gemma3ForCausalLM
    config = config_class(**{**TINY_GEMMA, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.3 if "norm" in name else 0.1) * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_family_checkpoint(path: Path, arch: str = "qwen2", seed: int = 0, **overrides) -> Path:
    """Save a random transformers ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``Phi3ForCausalLM`` of the tiny
    shape (no window unless asked for) to ``path``; norms and biases perturbed (transformers starts them at
    one and zero), so that loading them is seen."""
    import torch
    import transformers

    kwargs = {**TINY_MISTRAL, "sliding_window": None, **overrides}
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[arch]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_chatml_tokenizer(folder: Path, vocab_size: int = 320, lines: Sequence[str] = ()) -> Path:
    """A byte-level BPE ``tokenizer.json`` of ``vocab_size`` tokens trained on ``lines`` (Qwen's kind of
    tokenizer: its pre-tokenizer, without its NFC normalizer) whose last three ids are ChatML's
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, with a ``tokenizer_config.json`` holding Qwen's ChatML
    chat template (EOS ``<|im_end|>``, no BOS), in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import AddedToken, Regex

    tok = Tokenizer(models.BPE())
    # Qwen's split (Llama 3's regex with single digits), then bytes (transformers' Qwen2Tokenizer)
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(CHATML_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(lines) or ["the quick brown fox jumps over the lazy dog"] * 8
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIAL])
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "model_max_length": 256}))
    return folder


_CHAT_WORDS = ("you are a careful assistant hello hi how can i help name two rivers the nile and amazon blue sky "
               "what is weather in paris today sunny call tool get_weather city result thanks bye see system user "
               "answer question one word yes no 42 café").split()


def _tiny_bpe_json() -> str:
    """A 400-token byte-level BPE (GPT-2 style) with ChatML's special tokens, trained on a seeded corpus."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_CHAT_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


def write_chat_tokenizer(folder: Path, chat_template: str) -> Path:
    """A tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``) with ``chat_template``: the tiny
    byte-level BPE, EOS ``<|im_end|>``, no BOS; transformers loads it as ``PreTrainedTokenizerFast``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tiny_bpe_json(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "add_bos_token": False, "chat_template": chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def reference_prefix_mask(hf, messages, tools=None):
    """The prefix rule computed with transformers alone: token j is learned when its offsets overlap
    render(messages[:k + 1])[len(render(messages[:k], generation prompt)):] for an assistant message k."""
    text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
    encoding = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(encoding.input_ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(hf.apply_chat_template(messages[:k], tools=tools, tokenize=False, add_generation_prompt=True))
        end = len(hf.apply_chat_template(messages[: k + 1], tools=tools, tokenize=False))
        for j, (a, b) in enumerate(encoding.offset_mapping):
            if a < end and b > start:
                mask[j] = 1
    return encoding.input_ids, mask


def lora_loss_and_grads(model, ids, segment_ids=None, position_ids=None, checkpoint=False):
    """LoRA rank 4 on every projection of ``model`` with random A and B (seed 7), then the mean next-token
    cross-entropy of ``ids`` (B, L) and its gradient for every LoRA array: ``(loss, {path: gradient})``."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_qlora.lora import apply_lora

    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    # LoRA B starts at zero; random values make every adapter's gradient depend on attention.
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(7)) * 0.1,
                                   model.trainable_parameters()))
    model.model.grad_checkpoint = checkpoint

    def loss(params):
        model.update(params)
        logits = model(ids, position_ids=position_ids, segment_ids=segment_ids)
        return mx.mean(nn.losses.cross_entropy(logits[:, :-1], ids[:, 1:]))

    value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
    return float(value), dict(tree_flatten(grads))


def hf_reference(path):
    """transformers' own model of the checkpoint folder ``path``: eager attention, float32, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def assert_left_padding_matches(path, pads: Sequence[int], length: int, atol: float, vocab: int = 320,
                                seed: int = 4) -> None:
    """Rows left-padded by ``pads`` tokens (one row each): our logits, given the padding as ``position_ids``
    and ``attention_mask``, equal transformers' (``hf_reference``) on every real position within ``atol``."""
    import torch

    from mlx_qlora.model import load_model

    ids = np.random.default_rng(seed).integers(3, vocab, size=(len(pads), length))
    attention_mask = np.ones_like(ids)
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    ours = np.array(load_model(path)(mx.array(ids), position_ids=mx.array(position_ids),
                                     attention_mask=mx.array(attention_mask)))
    with torch.no_grad():
        ref = hf_reference(path)(torch.tensor(ids), attention_mask=torch.tensor(attention_mask)).logits.numpy()
    assert np.isfinite(ours).all()
    for row, pad in enumerate(pads):
        np.testing.assert_allclose(ours[row, pad:], ref[row, pad:], atol=atol, rtol=0, err_msg=f"row {row}")


def assert_logits_match(path, rows: int, length: int, atol: float, vocab: int = 320) -> None:
    """Random ids (rows, length), seeded by ``length``: our logits equal transformers' (``hf_reference``)
    within ``atol``."""
    import torch

    from mlx_qlora.model import load_model

    ids = np.random.default_rng(length).integers(0, vocab, size=(rows, length))
    ours = np.array(load_model(path)(mx.array(ids)))
    with torch.no_grad():
        ref = hf_reference(path)(torch.tensor(ids)).logits.numpy()
    assert ours.shape == ref.shape == (rows, length, vocab)
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def randomize_peft_lora(peft_model, std: float = 1.0, seed: int = 0) -> None:
    """Draw every LoRA matrix of a PEFT model from N(0, std^2) (``torch.manual_seed(seed)``): PEFT starts B
    at zero, which would leave the adapters without effect."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(std * torch.randn_like(p))


def run_script(name: str, *args: str, env: Optional[dict] = None, timeout: float = 300):
    """``scripts/<name>`` with ``args`` in a fresh process, the checkout's ``src/`` first on its path and
    ``env`` added to the environment: the ``subprocess.CompletedProcess`` (text output captured)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root / "src"), **(env or {})}
    return subprocess.run([sys.executable, str(root / "scripts" / name), *args], capture_output=True, text=True,
                          env=environment, timeout=timeout)


def script_output(done) -> str:
    """The standard output of a script run (``run_script``) that must have succeeded."""
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def attention_inputs(B=2, H=4, Hkv=2, L=77, D=16, seed=0):
    """Random q (B, H, L, D), k, v (B, Hkv, L, D) and per-output loss weights (B, H, L, D), float32: attention
    paths compared with a loss that weighs every output differently."""
    keys = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, H, L, D), key=keys[0])
    k = mx.random.normal((B, Hkv, L, D), key=keys[1])
    v = mx.random.normal((B, Hkv, L, D), key=keys[2])
    weights = mx.random.normal((B, H, L, D), key=keys[3])
    return q, k, v, weights


def left_padding(L: int, pad: int = 10) -> mx.array:
    """(2, L) attention mask: row 0 left-padded by ``pad`` tokens, row 1 not."""
    mask = np.ones((2, L), dtype=np.int32)
    mask[0, :pad] = 0
    return mx.array(mask)


def assert_same_lora_training(results, atol: float) -> None:
    """``results``: two ``lora_loss_and_grads`` results of the tiny two-layer model (all seven projections
    adapted); their losses and every LoRA gradient agree within ``atol``."""
    (plain_loss, plain), (ours_loss, ours) = results
    assert len(plain) == 2 * 7 * 2  # lora_A and lora_B of seven projections in two layers
    assert abs(plain_loss - ours_loss) < atol
    for key in plain:
        np.testing.assert_allclose(np.array(ours[key]), np.array(plain[key]), atol=atol, rtol=0, err_msg=key)


def assert_same_attention(ours_fn, plain_fn, q, k, v, weights, atol: float) -> None:
    """Two attention functions ``(q, k, v) -> out`` agree within ``atol`` on their outputs and on the
    gradients of q, k and v of ``sum(out * weights)`` (same shapes and dtypes)."""
    np.testing.assert_allclose(np.array(ours_fn(q, k, v)), np.array(plain_fn(q, k, v)), atol=atol, rtol=0)
    ours = mx.grad(lambda q, k, v: mx.sum(ours_fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)
    plain = mx.grad(lambda q, k, v: mx.sum(plain_fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, plain):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=0, err_msg=f"d{name}")


def seam_calls(monkeypatch, on_cuda: bool, capability=(9, 0)) -> list:
    """Record which path ``model/attention.py``'s seam took (the band, causal chunks, block-wise; nothing for
    the plain path), with the backend seen as CUDA of that compute capability, or not."""
    from mlx_qlora.kernels.cuda import nvrtc, sdpa
    from mlx_qlora.model import attention

    calls = []
    monkeypatch.setattr(attention, "on_cuda", lambda: on_cuda)
    monkeypatch.setattr(sdpa, "on_cuda", lambda: on_cuda)
    monkeypatch.setattr(nvrtc, "capability", lambda: capability)
    for name in ("banded_attention", "chunked_causal_attention", "blockwise_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                          _real(*a, **kw))[1])
    return calls
