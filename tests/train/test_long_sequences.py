"""Long sequences end to end: ``prepare_data.py --max-seq-len 32768`` keeps documents of thousands of tokens
whole, and ``finetune.py --packing`` trains on rows packed to that length, through block-wise attention
and the tiled layers (``model/blockwise.py``, ``model/tiled.py``), with a finite loss."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from support import run_script

WORDS = "the river city music science history blue green quick fox dog seven write list explain".split()


def _long_records(path: Path, lengths: list[int], seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for n in lengths:
            context = " ".join(rng.choice(WORDS) for _ in range(n))
            f.write(json.dumps({"instruction": "Summarize the text.", "context": context,
                                "response": "A text about " + rng.choice(WORDS) + "."}) + "\n")


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    # both long-sequence paths on rows of a few thousand tokens
    return run_script(name, *args, env={"MLX_QLORA_BLOCKWISE_FROM": "2048", "MLX_QLORA_BLOCKWISE_SHARE": "0",
                                        "MLX_QLORA_LAYER_TILE": "2048"}, timeout=600)


@pytest.mark.slow  # a model conversion, data preparation and two training steps on one packed row of about 8k tokens, about 20 s
def test_prepare_and_finetune_on_long_packed_rows(tmp_path, hf_checkpoint_factory, tiny_spm_path):
    from mlx_qlora.convert import convert_checkpoint

    full = tmp_path / "full"
    shutil.copytree(hf_checkpoint_factory("long-context", max_position_embeddings=32768), full)
    shutil.copy(tiny_spm_path, full / "tokenizer.model")
    model = tmp_path / "q4"
    convert_checkpoint(str(full), str(model), bits=4, group_size=None, dtype="float32")
    records = tmp_path / "long.jsonl"
    _long_records(records, [700, 600, 450, 350])

    data = tmp_path / "data"
    proc = _script("prepare_data.py", "--dataset", str(records), "--tokenizer", str(full / "tokenizer.model"),
                   "--out", str(data), "--max-seq-len", "32768", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((data / "meta.json").read_text())
    assert meta["max_seq_len"] == 32768
    assert meta["counts"]["truncated"] == 0 and meta["counts"]["dropped"] == 0  # every document kept whole
    assert meta["token_lengths"]["max"] > 2048  # longer than the thresholds of the long-sequence paths

    out = tmp_path / "run"
    proc = _script("finetune.py", "--model", str(model), "--data", str(data), "--out", str(out), "--packing",
                   "--batch-size", "1", "--iters", "2", "--grad-checkpoint", "--lora-rank", "4", "--log-every", "1",
                   "--eval-every", "1000", "--save-every", "1000", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in losses if "loss" in r]
    assert len(trained) == 2 and all(0 < r["loss"] < 20 for r in trained)
    assert all(r["tokens"] == meta["tokens"] for r in trained)  # one packed row of every example, each step
