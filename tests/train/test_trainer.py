"""The training loop: accumulation, exact resume, LoRA gradients through the 4-bit model against PEFT,
PEFT interop of trained adapters, and the fault paths (NaN, Ctrl-C, another tokenizer)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qlora.config import DataConfig, LoRAConfig, TrainConfig
from mlx_qlora.data.prepare import prepare_dataset
from mlx_qlora.errors import UserError
from mlx_qlora.model import load_model
from mlx_qlora.lora import apply_lora
from mlx_qlora.lora.adapters import load_adapters
from mlx_qlora.train.checkpoint import latest_checkpoint, load_checkpoint
from mlx_qlora.train.optimizer import AdamW
from mlx_qlora.train.flat import FlatLayout
from mlx_qlora.train.step import add_trees, make_grad_fn, make_update_fn
from mlx_qlora.train.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs):
    """A full-precision and a 4-bit copy of the tiny transformers model (with the tiny tokenizer), and data."""
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    full = tiny_model_dirs["full"]
    prepare_dataset(SAMPLE, full / "tokenizer.model", data, DataConfig(max_seq_len=96, val_fraction=0.1))
    return {"root": root, "full": full, "quant": tiny_model_dirs["quant"], "data": data}


def _config(ws, out, **overrides) -> TrainConfig:
    values = dict(model=str(ws["quant"]), data=str(ws["data"]), out=str(out), batch_size=4, iters=20,
                  learning_rate=3e-3, warmup_steps=3, eval_every=1000, save_every=5, log_every=1,
                  lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1), seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _adapter_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    params, _ = load_adapters(run_dir)
    return {k: np.array(v) for k, v in params.items()}


def _adapted_model(ws, rng):
    """The 4-bit tiny model with rank-4 adapters whose B is random too (it starts at zero), so that
    gradients reach A."""
    model = load_model(ws["quant"])
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    return model


def test_accumulation_equals_one_big_batch(workspace):
    """k micro-batches with summed token losses give the loss and update of one batch k times larger."""
    rng = np.random.default_rng(0)
    model = _adapted_model(workspace, rng)
    ids = rng.integers(3, 320, size=(4, 24)).astype(np.int32)
    labels = ids.copy()
    labels[:, :9] = -100
    labels[1, 15:] = -100  # rows learn different numbers of tokens
    labels[3, 20:] = -100
    labels[2, 21:] = -100  # so trimming the second micro-batch to 21 columns drops only ignored labels
    grad = make_grad_fn(model, chunk=16, packed=False)
    params = dict(tree_flatten(model.trainable_parameters()))
    layout = FlatLayout(params)
    update = make_update_fn(AdamW(weight_decay=0.01), max_grad_norm=None, layout=layout)
    flat, state = layout.concat(params), layout.flat_state(AdamW(weight_decay=0.01).init(params))
    lr = mx.array(1e-2)

    s_big, n_big, g_big = grad(mx.array(ids), mx.array(labels))
    _, p_big, _, _ = update(flat, g_big, state, lr, n_big)
    s_acc, n_acc, g_acc = mx.array(0.0), mx.array(0), None
    for rows, length in (([0, 1], 24), ([2, 3], 21)):  # the second micro-batch is also shorter
        s, n, g = grad(mx.array(ids[rows, :length]), mx.array(labels[rows, :length]))
        s_acc, n_acc, g_acc = s_acc + s, n_acc + n, add_trees(g_acc, g)
    _, p_acc, _, _ = update(flat, g_acc, state, lr, n_acc)
    assert int(n_acc.item()) == int(n_big.item())
    np.testing.assert_allclose((s_acc / n_acc).item(), (s_big / n_big).item(), rtol=0, atol=1e-6)
    for key in p_big:
        np.testing.assert_allclose(np.array(p_acc[key]), np.array(p_big[key]), rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("overlap,stopped_at", [(True, 9), (False, 8)])
def test_exact_resume(workspace, tmp_path, overlap, stopped_at):
    """Ctrl-C after step 8 and resuming gives bit-identical losses and adapters to an uninterrupted run.

    With overlapping steps, step 9 was queued before step 8's loss was read: it is finished and saved too."""
    full = Trainer(_config(workspace, tmp_path / "full", overlap_steps=overlap), progress=False)
    full.train()

    class StopAfterEight:  # asks for the stop Ctrl-C makes
        def on_step_end(self, trainer, step, metrics):
            return step == 8

    interrupted = Trainer(_config(workspace, tmp_path / "resumed", overlap_steps=overlap), progress=False,
                          callbacks=[StopAfterEight()])
    summary = interrupted.train()
    assert summary["stop_reason"] == "interrupted" and summary["step"] == stopped_at
    resumed = Trainer(_config(workspace, tmp_path / "resumed", overlap_steps=overlap), resume=True, progress=False)
    assert resumed.state.step == stopped_at
    assert resumed.train()["step"] == 20

    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 21))
    assert got == expected  # exact float equality on the CPU
    a, b = _adapter_arrays(tmp_path / "full"), _adapter_arrays(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert expected[20] < expected[1]  # and it learned something


def test_overlapping_steps_train_exactly_as_waiting_for_each(workspace, tmp_path):
    """Queueing each step before the previous loss is read changes when the host waits, not what is computed."""
    runs = {}
    for overlap in (True, False):
        run = tmp_path / f"overlap_{overlap}"
        Trainer(_config(workspace, run, iters=7, save_every=3, overlap_steps=overlap), progress=False).train()
        runs[overlap] = (_losses(run), _adapter_arrays(run))
    assert sorted(runs[True][0]) == list(range(1, 8)) and runs[True][0] == runs[False][0]
    for key, value in runs[True][1].items():
        np.testing.assert_array_equal(value, runs[False][1][key], err_msg=key)


def test_the_checkpointing_note_names_the_segments_the_largest_batch_gets(workspace, tmp_path, monkeypatch):
    from mlx_qlora import settings
    from mlx_qlora.train import trainer as trainer_module

    assert Trainer(_config(workspace, tmp_path / "a"), progress=False).checkpoint_note() is None
    trainer = Trainer(_config(workspace, tmp_path / "b", grad_checkpoint=True), progress=False)
    layers = len(trainer.model.layers)
    assert trainer.checkpoint_note() == f"gradient checkpointing: every layer's input kept ({layers} layers)"
    with settings.override(checkpoint_span=2):
        assert "one input per segment of 2 layers" in trainer.checkpoint_note()
    # the note asks the model's own rule about the largest batch: batch size x the longest padded row
    tokens = 4 * trainer.iterator.row_lengths()[-1]
    asked = []
    monkeypatch.setattr(trainer_module, "checkpoint_span", lambda *args: asked.append(args) or 3)
    assert trainer.checkpoint_note() == (f"gradient checkpointing: the largest batch ({tokens:,} tokens) keeps one "
                                         f"input per segment of 3 layers ({layers} layers; MLX_QLORA_CHECKPOINT_SPAN)")
    assert asked == [(layers, tokens * trainer.model.args.hidden_size * trainer.dtype.size, mx.get_memory_limit())]


def test_nan_stops_and_keeps_last_good_checkpoint(workspace, tmp_path):
    trainer = Trainer(_config(workspace, tmp_path / "run", save_every=2), progress=False)
    grad, calls = trainer.grad_fn, []

    def poisoned(*arrays):
        calls.append(1)
        loss_sum, n, grads = grad(*arrays)
        return (loss_sum * float("nan"), n, grads) if len(calls) == 5 else (loss_sum, n, grads)

    trainer.grad_fn = poisoned
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5"):
        trainer.train()
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000004"
    ckpt = load_checkpoint(latest)
    assert ckpt["step"] == 4
    assert all(np.isfinite(np.array(v)).all() for v in ckpt["adapters"].values())


def test_data_from_another_tokenizer_is_refused(workspace, tmp_path, mistral_tokenizer_path):
    data = tmp_path / "other"
    prepare_dataset(SAMPLE, mistral_tokenizer_path, data, DataConfig(max_seq_len=96, val_fraction=0.1))
    with pytest.raises(UserError, match="another tokenizer"):
        Trainer(_config(workspace, tmp_path / "run", data=str(data)), progress=False)


def test_sigint_saves_a_checkpoint_and_exits_130(workspace, tmp_path):
    """Ctrl-C saves the run and exits with the shell's status for it, 130, so `finetune.py ... && next` stops."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model", str(workspace["quant"]),
           "--data", str(workspace["data"]), "--out", str(run), "--iters", "100000", "--batch-size", "2",
           "--save-every", "100000", "--log-every", "1", "--lora-rank", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    ckpt = load_checkpoint(run)
    assert ckpt["step"] >= 2
    assert (run / "adapter_model.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "interrupted"


def test_lora_gradients_through_4bit_model_match_peft(workspace):
    """Gradients of A and B through our 4-bit model equal PEFT's on the dequantized weights (1e-4)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from mlx_qlora.train.step import make_loss_fn
    import mlx.nn as nn

    model = load_model(workspace["quant"])
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    rng = np.random.default_rng(1)
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    ids = rng.integers(3, 320, size=(2, 30)).astype(np.int64)
    labels = ids.copy()
    labels[:, :12] = -100

    loss_fn = make_loss_fn(chunk=8, packed=False)
    (loss_sum, n), grads = nn.value_and_grad(model, loss_fn)(model, mx.array(ids), mx.array(labels))
    ours = {k: np.array(v) / n.item() for k, v in tree_flatten(grads)}

    ref = transformers.AutoModelForCausalLM.from_pretrained(workspace["full"], dtype=torch.float32)
    with torch.no_grad():  # the reference base is our dequantized 4-bit weights
        for name, module in model.named_modules():
            if hasattr(module, "base") and hasattr(module.base, "dequantize"):
                ref.get_submodule(name).weight.copy_(torch.from_numpy(np.array(module.base.dequantize(mx.float32))))
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for key, value in tree_flatten(model.trainable_parameters()):
            peft_model.get_parameter(f"base_model.model.{key}.default.weight").copy_(torch.from_numpy(np.array(value)))
    out = peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(out.loss.item() - loss_sum.item() / n.item()) < 1e-5
    for key, value in ours.items():
        theirs = peft_model.get_parameter(f"base_model.model.{key}.default.weight").grad.numpy()
        np.testing.assert_allclose(value, theirs, rtol=0, atol=1e-4, err_msg=key)


def test_trained_adapters_load_in_peft_with_equal_logits(workspace, tmp_path):
    """Adapters trained here, loaded by PEFT on the transformers model, give our logits (1e-4)."""
    import torch
    import transformers
    from peft import PeftModel

    run = tmp_path / "run"
    config = _config(workspace, run, model=str(workspace["full"]), iters=6, save_every=100,
                     lora=LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    Trainer(config, progress=False).train()

    ours = load_model(workspace["full"])
    params, lora_config = load_adapters(run)
    apply_lora(ours, lora_config)
    ours.update(tree_unflatten(list(params.items())))
    ids = np.random.default_rng(2).integers(3, 320, size=(2, 40))
    logits = np.array(ours(mx.array(ids)))

    base = transformers.AutoModelForCausalLM.from_pretrained(workspace["full"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - np.array(load_model(workspace["full"])(mx.array(ids)))).max() > 1e-3  # adapters matter
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)


def test_adapters_saved_by_peft_load_here_with_equal_logits(workspace, tmp_path):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(workspace["full"], dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(3).integers(3, 320, size=(1, 33))
    with torch.no_grad():
        ref = peft_model.eval()(input_ids=torch.tensor(ids)).logits.numpy()

    ours = load_model(workspace["full"])
    params, lora_config = load_adapters(tmp_path / "peft")
    apply_lora(ours, lora_config)
    ours.update(tree_unflatten(list(params.items())))
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), ref, rtol=0, atol=1e-4)


def test_max_time_stops_cleanly_and_saves(workspace, tmp_path):
    run = tmp_path / "run"
    config = _config(workspace, run, iters=None, max_time="1s", save_every=10**6, eval_every=10**6,
                     lora=LoRAConfig(rank=2))
    summary = Trainer(config, progress=False).train()
    assert summary["stop_reason"] == "time budget reached"
    assert summary["elapsed_s"] >= 1.0 and summary["step"] >= 1
    assert load_checkpoint(run)["step"] == summary["step"]
    assert (run / "adapter_model.safetensors").exists() and (run / "loss.png").exists()


def test_resume_refuses_other_lora_settings(workspace, tmp_path):
    """Adapters of another shape, set or scale cannot continue the checkpoint's run: a clear error naming the
    checkpoint and the setting, before anything is written."""
    run = tmp_path / "run"
    Trainer(_config(workspace, run, iters=5), progress=False).train()  # rank 4, alpha 8, dropout 0.1, all
    before = sorted(p.name for p in run.rglob("*"))
    for changed, match in ((dict(rank=8), r"is \(4, 64\) in the checkpoint \(rank 4\) and \(8, 64\) here"),
                           (dict(targets=("q_proj", "v_proj")), "have an extra .*mlp.down_proj.lora_A"),
                           (dict(layers=[0]), "have an extra model.layers.1."),
                           (dict(alpha=16.0), "lora alpha 8.0, this run asks for 16.0"),
                           (dict(use_rslora=True), "lora use_rslora False"),
                           (dict(dropout=0.0), "lora dropout 0.1, this run asks for 0.0")):
        lora = LoRAConfig(**{**dict(rank=4, alpha=8.0, dropout=0.1), **changed})
        with pytest.raises(UserError, match=match) as error:
            Trainer(_config(workspace, run, iters=10, lora=lora), resume=True, progress=False)
        assert "step-0000005" in str(error.value) and "new --out folder" in str(error.value)
    assert sorted(p.name for p in run.rglob("*")) == before
    assert Trainer(_config(workspace, run, iters=10), resume=True, progress=False).state.step == 5  # same: resumes


def test_auto_dtype_is_resolved_said_and_recorded(workspace, tmp_path, capsys):
    """The default ``dtype`` (auto) is resolved when the run starts: float32 on the CPU, said in the run's
    first lines and stored in run_config.json, so a resume computes as the run did."""
    assert TrainConfig().dtype == "auto"
    run = tmp_path / "run"
    trainer = Trainer(_config(workspace, run, iters=1), progress=False)
    assert trainer.config.dtype == "float32" and trainer.dtype == mx.float32
    trainer.train()
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "compute dtype: float32 (auto: the CPU computes in float32); adapters and optimizer state: float32"
    assert json.loads((run / "run_config.json").read_text())["dtype"] == "float32"


def test_token_budget_empty_rows_add_nothing_and_run_says_how_it_batches(workspace, tmp_path, capsys):
    """Under ``max_batch_tokens`` a batch is filled with empty rows (padding, no learned token) up to its
    shape's row count: they leave the loss sum, the learned-token count and the gradients unchanged."""
    rng = np.random.default_rng(1)
    model = _adapted_model(workspace, rng)
    ids = rng.integers(3, 320, size=(2, 24)).astype(np.int32)
    labels = ids.copy()
    labels[:, :7] = -100
    padded_ids = np.concatenate([ids, np.full((3, 24), 2, np.int32)])
    padded_labels = np.concatenate([labels, np.full((3, 24), -100, np.int32)])
    grad = make_grad_fn(model, chunk=16, packed=False)
    s, n, g = grad(mx.array(ids), mx.array(labels))
    s_pad, n_pad, g_pad = grad(mx.array(padded_ids), mx.array(padded_labels))
    assert int(n.item()) == int(n_pad.item())
    np.testing.assert_allclose(s_pad.item(), s.item(), rtol=1e-6)
    for key in g:
        np.testing.assert_allclose(np.array(g_pad[key]), np.array(g[key]), rtol=1e-5, atol=1e-7, err_msg=key)

    run = tmp_path / "run"
    trainer = Trainer(_config(workspace, run, iters=2, max_batch_tokens=256), progress=False)
    trainer.train()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("batches: up to 256 tokens (rows x padded length); ")
    assert json.loads((run / "run_config.json").read_text())["max_batch_tokens"] == 256
    for rows in trainer.iterator.plan(0):
        batch = trainer.iterator.make_batch(rows)
        assert batch["input_ids"].size <= 256 or len(batch["input_ids"]) == 1


def test_lora_init_loftq_starts_from_the_factors(workspace):
    """--lora-init loftq: the new adapters' update scale * B @ A is the conversion's LoftQ factors' B @ A
    (stored at scale 1), here at alpha 8 / rank 4."""
    from mlx_qlora.convert import convert_checkpoint
    from mlx_qlora.lora.loftq import LOFTQ_DIR

    folder = workspace["root"] / "loftq-model"
    convert_checkpoint(workspace["full"], folder, loftq_rank=4, dtype="float32", progress=False)
    trainer = Trainer(_config(workspace, workspace["root"] / "run-loftq", model=str(folder), lora_init="loftq"),
                      progress=False)
    stored, _ = load_adapters(folder / LOFTQ_DIR)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = trainer.model
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        expected = np.array(stored[path + ".lora_B"] @ stored[path + ".lora_A"])
        np.testing.assert_allclose(np.array(layer.delta_weight()), expected, rtol=1e-5, atol=1e-6)
