"""Shared fixtures: tiny random models, tiny Hugging Face checkpoints, tiny sentencepiece models, the real
Mistral v1 tokenizer; and the ``gpu`` marker's skip.

Everything is seeded and small so the suite stays fast on two CPU cores. Reference models come from
``transformers`` (random weights, ``save_pretrained``), never from our own code. The test folders mirror
``src/mlx_qlora/``; the fixtures here are visible in every folder.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX on Linux)

# Helpers shared by test modules live in tests/support.py (``from support import ...``).
sys.path.append(str(Path(__file__).resolve().parent))
from support import TINY_MISTRAL, tiny_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need MLX's CUDA backend: skipped where MLX computes on anything else."""
    from mlx_qlora.device import on_cuda

    if on_cuda():
        return
    skip = pytest.mark.skip(reason="needs MLX on a CUDA GPU (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(name="tiny_model")
def tiny_model_fixture():
    """The factory ``tiny_model(seed=0, **overrides) -> MistralForCausalLM`` (test modules cannot import
    conftest): a small random model for tests that need no transformers reference (those that do use
    ``hf_checkpoint_factory``, of the same shape)."""
    return tiny_model


def make_hf_checkpoint(path: Path, arch: str = "mistral", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised transformers Mistral/Llama model to ``path`` (float32 safetensors)."""
    import torch
    import transformers

    config_kwargs = {**TINY_MISTRAL, **overrides}
    if arch == "llama":
        config_kwargs.pop("sliding_window", None)
        config = transformers.LlamaConfig(**config_kwargs)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.MistralConfig(**config_kwargs)
        cls = transformers.MistralForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    # transformers initialises norms to ones; perturb them so the test sees whether we load them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


@pytest.fixture(scope="session")
def hf_checkpoint_factory(tmp_path_factory):
    """``factory(name, arch='mistral', seed=0, **config)`` -> directory of a saved transformers model."""
    cache: dict = {}

    def factory(name: str, arch: str = "mistral", seed: int = 0, **overrides) -> Path:
        key = (name, arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_hf_checkpoint(tmp_path_factory.mktemp(name), arch=arch, seed=seed, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(hf_checkpoint_factory) -> Path:
    """A 2-layer Mistral (hidden 64, GQA 4/2, window 16, vocab 320) saved by transformers."""
    return hf_checkpoint_factory("tiny-mistral")


def _corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the a an of to in on for with model data train answer question context response instruction "
        "river mountain city music science history color number seven blue green quick lazy fox dog "
        "write list explain summarize classify why how what when where who Paris Tokyo café naïve 42"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_spm_path(tmp_path_factory) -> Path:
    """A 320-piece sentencepiece BPE model (unk 0, bos 1, eos 2, no pad) trained on a seeded corpus."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return root / "tokenizer.model"


@pytest.fixture(scope="session")
def mistral_tokenizer_path() -> Path:
    """The real Mistral v1 ``tokenizer.model`` (vocab 32000) shipped in the ``mistral-common`` package."""
    import mistral_common

    path = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"
    if not path.exists():
        pytest.fail(f"mistral-common no longer ships {path.name}; update the fixture")
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_hf_checkpoint, tiny_spm_path) -> dict:
    """The tiny transformers model with the tiny tokenizer: ``full`` (as saved) and ``quant`` (our 4-bit)."""
    import shutil

    from mlx_qlora.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("tiny-models")
    full = root / "full"
    shutil.copytree(tiny_hf_checkpoint, full)
    shutil.copy(tiny_spm_path, full / "tokenizer.model")
    quant = root / "q4"
    convert_checkpoint(str(full), str(quant), bits=4, group_size=None, dtype="float32")
    return {"full": full, "quant": quant}
