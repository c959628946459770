"""LoRALinear against torch, fuse(), apply_lora on a model, and parameter counts for Mistral-7B's shapes."""

from __future__ import annotations

import math

import numpy as np
import psutil
import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from support import tiny_model
from mlx_qlora.config import LoRAConfig
from mlx_qlora.model import MistralForCausalLM, ModelArgs
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.lora import LoRALinear
from mlx_qlora.lora import apply_lora
from mlx_qlora.lora import count_parameters
from mlx_qlora.lora import format_trainable
from mlx_qlora.model.modules import quantize_model

IN, OUT, RANK = 96, 80, 8


def _bases(seed=0):
    mx.random.seed(seed)
    linear = nn.Linear(IN, OUT, bias=False)
    return {"linear": linear, "quantized": QuantizedLinear.from_linear(linear, group_size=32)}


def _base_weight(base) -> np.ndarray:
    return np.array(base.dequantize(mx.float32) if isinstance(base, QuantizedLinear) else base.weight)


def _with_random_b(layer: LoRALinear, seed=1) -> LoRALinear:
    layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape, key=mx.random.key(seed))
    return layer


def test_init_like_peft():
    import torch

    layer = LoRALinear.from_base(nn.Linear(IN, OUT, bias=False), rank=RANK, alpha=16.0)
    assert layer.lora_A.shape == (RANK, IN) and layer.lora_B.shape == (OUT, RANK)
    assert not np.any(np.array(layer.lora_B))
    # PEFT: kaiming_uniform_(lora_A, a=sqrt(5)); torch's own formula gives its bound
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / IN)
    a = np.abs(np.array(layer.lora_A))
    assert a.max() <= bound and a.max() > 0.95 * bound
    assert abs(np.array(layer.lora_A).std() - bound / math.sqrt(3)) < 0.1 * bound
    assert layer.scale == 2.0
    assert LoRALinear.from_base(nn.Linear(IN, OUT), rank=16, alpha=32.0, use_rslora=True).scale == 8.0


@pytest.mark.parametrize("kind", ["linear", "quantized"])
def test_zero_b_equals_base(kind):
    base = _bases()[kind]
    layer = LoRALinear.from_base(base, rank=RANK, dropout=0.5)  # dropout only touches the adapter branch
    x = mx.random.normal((2, 5, IN))
    layer.train()
    assert mx.array_equal(layer(x), base(x))
    layer.eval()
    assert mx.array_equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "quantized"])
def test_forward_and_gradients_match_torch(kind):
    """Output and dL/dA, dL/dB against torch autograd; no gradient reaches the base."""
    import torch

    layer = _with_random_b(LoRALinear.from_base(_bases()[kind], rank=RANK, alpha=16.0))
    x = mx.random.normal((3, 4, IN), key=mx.random.key(2))
    cotangent = mx.random.normal((3, 4, OUT), key=mx.random.key(3))

    def loss_fn(model, x):
        return (model(x) * cotangent).sum()

    loss, grads = nn.value_and_grad(layer, loss_fn)(layer, x)
    assert sorted(k for k, _ in tree_flatten(grads)) == ["lora_A", "lora_B"]

    t = {k: torch.tensor(np.array(v), dtype=torch.float64) for k, v in
         dict(x=x, g=cotangent, A=layer.lora_A, B=layer.lora_B).items()}
    t["A"].requires_grad_(True)
    t["B"].requires_grad_(True)
    w = torch.tensor(_base_weight(layer.base), dtype=torch.float64)
    y = t["x"] @ w.T + layer.scale * (t["x"] @ t["A"].T) @ t["B"].T
    (y * t["g"]).sum().backward()
    assert np.allclose(np.array(layer(x)), y.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - (y * t["g"]).sum().item()) <= 1e-4 * abs(loss.item()) + 1e-3
    for name in ("A", "B"):
        ours = np.array(grads[f"lora_{name}"])
        ref = t[name].grad.numpy()
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), name


@pytest.mark.parametrize("kind", ["linear", "quantized"])
def test_input_gradient_matches_torch(kind):
    """dL/dx of the fused layer (base and adapter sums inside the matmuls) against torch autograd."""
    import torch

    layer = _with_random_b(LoRALinear.from_base(_bases()[kind], rank=RANK, alpha=16.0))
    x = mx.random.normal((3, 4, IN), key=mx.random.key(5))
    cotangent = mx.random.normal((3, 4, OUT), key=mx.random.key(6))
    assert layer._fused(x) is not None  # 12 rows: the dense path, which the fused form covers
    dx = mx.grad(lambda x: (layer(x) * cotangent).sum())(x)

    tx = torch.tensor(np.array(x), dtype=torch.float64, requires_grad=True)
    a, b = (torch.tensor(np.array(v), dtype=torch.float64) for v in (layer.lora_A, layer.lora_B))
    w = torch.tensor(_base_weight(layer.base), dtype=torch.float64)
    y = tx @ w.T + layer.scale * (tx @ a.T) @ b.T
    (y * torch.tensor(np.array(cotangent), dtype=torch.float64)).sum().backward()
    ref = tx.grad.numpy()
    assert np.abs(np.array(dx) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fused_form_applies_where_it_is_exact():
    """No fused form with dropout in training (the adapter sees other inputs than the base) or a 4-bit
    base's few-row path; in eval mode dropout is off, so the fused form applies again. A biased base has
    one, its bias added after (``test_lora_on_a_biased_base`` checks the values)."""
    bases = _bases()
    x, one_row = mx.random.normal((2, 8, IN)), mx.random.normal((1, 1, IN))
    with_dropout = LoRALinear.from_base(bases["quantized"], rank=RANK, dropout=0.1)
    assert with_dropout._fused(x) is None
    with_dropout.eval()
    assert with_dropout._fused(x) is not None
    assert LoRALinear.from_base(bases["quantized"], rank=RANK)._fused(one_row) is None
    assert LoRALinear.from_base(nn.Linear(IN, OUT), rank=RANK)._fused(x) is not None
    assert LoRALinear.from_base(bases["linear"], rank=RANK)._fused(one_row) is not None


def test_bfloat16_fused_form_stays_near_the_float32_formula():
    """In bfloat16 the fused layer's output and gradients are within bfloat16 rounding of the float32 formula."""
    layer = _with_random_b(LoRALinear.from_base(_bases()["quantized"], rank=RANK, alpha=16.0))
    x = mx.random.normal((4, 16, IN), key=mx.random.key(7))
    cotangent = mx.random.normal((4, 16, OUT), key=mx.random.key(8))
    w = layer.base.dequantize(mx.float32)

    def formula(params, x):
        y = x @ w.T + layer.scale * (x @ params["lora_A"].T) @ params["lora_B"].T
        return (y * cotangent).sum()

    def ours(params, x):
        layer.update(params)
        return (layer(x.astype(mx.bfloat16)).astype(mx.float32) * cotangent.astype(mx.bfloat16)).sum()

    params = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    (ref_grads, ref_dx), (got_grads, got_dx) = (mx.grad(f, argnums=(0, 1))(params, x) for f in (formula, ours))
    assert got_grads["lora_A"].dtype == mx.float32 and got_dx.dtype == mx.float32
    for got, ref in ((got_dx, ref_dx), (got_grads["lora_A"], ref_grads["lora_A"]),
                     (got_grads["lora_B"], ref_grads["lora_B"])):
        err = float(mx.abs(got - ref).max() / mx.abs(ref).max())
        assert err < 0.03, err


@pytest.mark.parametrize("kind", ["linear", "quantized"])
def test_fuse_equals_lora_output(kind):
    layer = _with_random_b(LoRALinear.from_base(_bases()[kind], rank=RANK, alpha=16.0))
    fused = layer.fuse()
    assert type(fused) is nn.Linear and "bias" not in fused
    x = mx.random.normal((4, 6, IN), key=mx.random.key(4))
    diff = np.abs(np.array(fused(x)) - np.array(layer(x))).max()
    assert diff <= 1e-5, diff


def test_fuse_into_full_precision_weight():
    """With the original weight the merge is W_full + scale * B @ A, with no quantization error left."""
    bases = _bases()
    layer = _with_random_b(LoRALinear.from_base(bases["quantized"], rank=RANK, alpha=16.0))
    w_full = bases["linear"].weight
    fused = layer.fuse(full_weight=w_full)
    ref = np.array(w_full).astype(np.float64) + layer.scale * (
        np.array(layer.lora_B).astype(np.float64) @ np.array(layer.lora_A).astype(np.float64)
    )
    assert np.abs(np.array(fused.weight) - ref).max() <= 1e-6
    # against the LoRA layer on the 4-bit base, the merged layer differs by the quantization error only:
    # per output, at most sum_i |x_i| * step / 2
    x = mx.random.normal((5, IN), key=mx.random.key(5))
    step = np.repeat(np.array(layer.base.scales), 32, axis=1)
    bound = np.abs(np.array(x)) @ (0.5 * step).T
    assert np.all(np.abs(np.array(fused(x)) - np.array(layer(x))) <= bound * (1 + 1e-4) + 1e-6)
    with pytest.raises(ValueError, match="full_weight"):
        layer.fuse(full_weight=mx.zeros((IN, OUT)))


def test_fuse_keeps_a_bias():
    base = nn.Linear(IN, OUT, bias=True)
    layer = _with_random_b(LoRALinear.from_base(base, rank=4))
    fused = layer.fuse()
    x = mx.random.normal((3, IN))
    assert mx.array_equal(fused.bias, base.bias)
    assert np.abs(np.array(fused(x)) - np.array(layer(x))).max() <= 1e-5


def _tiny_model(n_layers=3) -> MistralForCausalLM:
    return tiny_model(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      max_position_embeddings=64, sliding_window=None)


def test_apply_lora_targets_and_layers():
    model = _tiny_model()
    ids = mx.array([[1, 5, 9, 3]])
    before = model(ids)
    returned = apply_lora(model, targets="q_proj,v_proj", rank=4, alpha=8.0, layers=[-1])
    assert returned is model
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    assert trainable == [f"model.layers.2.self_attn.{p}.lora_{m}" for p in ("q_proj", "v_proj") for m in "AB"]
    assert mx.array_equal(model(ids), before)  # B = 0
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8)
    assert count_parameters(model)[0] == 4 * (32 + 32) + 4 * (32 + 16)
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_lora(model, targets=["q_proj"], layers=[2])
    with pytest.raises(ValueError, match="unknown lora target"):
        apply_lora(_tiny_model(), targets="wqkv")
    with pytest.raises(ValueError, match="no projection matched"):  # Phi-3's name, not in this model
        apply_lora(_tiny_model(), targets="qkv_proj")
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(_tiny_model(), layers=[3])


def test_apply_lora_from_config_on_a_quantized_model_trains_adapters_only():
    model = quantize_model(_tiny_model(n_layers=2), group_size=32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
    assert sum(isinstance(m, LoRALinear) for _, m in model.named_modules()) == 14
    assert all(isinstance(m.base, QuantizedLinear) for _, m in model.named_modules() if isinstance(m, LoRALinear))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert len(names) == 28 and all(k.endswith(("lora_A", "lora_B")) for k in names)

    ids = mx.array([[3, 1, 4, 1, 5, 9]])

    def loss_fn(model):
        return model(ids).astype(mx.float32).square().mean()

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = dict(tree_flatten(grads))
    assert sorted(flat) == sorted(names)
    # with B = 0 the gradient of A is exactly zero and that of B is not
    assert all(not np.any(np.array(v)) for k, v in flat.items() if k.endswith("lora_A"))
    assert any(np.any(np.array(v)) for k, v in flat.items() if k.endswith("lora_B"))


def test_unfreezing_an_adapter_keeps_its_base_frozen():
    layer = LoRALinear.from_base(QuantizedLinear.from_linear(nn.Linear(IN, OUT, bias=False)), rank=2)
    layer.freeze()
    layer.unfreeze()
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["lora_A", "lora_B"]


def _mistral_7b_counts(rank: int) -> tuple[int, int]:
    """(LoRA parameters on all seven projections, base parameters) of Mistral-7B, by formula."""
    hidden, inter, layers, heads, kv_heads, vocab = 4096, 14336, 32, 32, 8, 32000
    head_dim = hidden // heads
    q = o = hidden * hidden
    k = v = hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter
    per_layer = q + k + v + o + mlp + 2 * hidden  # + two RMSNorm weights
    base = layers * per_layer + 2 * vocab * hidden + hidden  # + embeddings, untied lm_head, final norm
    kv_dim = kv_heads * head_dim
    lora_per_layer = rank * ((hidden + hidden) * 2 + (hidden + kv_dim) * 2 + 2 * (hidden + inter) + (inter + hidden))
    return layers * lora_per_layer, base


def test_count_parameters_mistral_7b_shapes_without_allocating():
    lora16, base = _mistral_7b_counts(16)
    assert (lora16, base) == (41_943_040, 7_241_732_096)
    rss_before = psutil.Process().memory_info().rss
    # MLX is lazy: the model's random initial weights and their quantization are graphs, never computed.
    model = quantize_model(MistralForCausalLM(ModelArgs()))
    assert count_parameters(model)[1] == base  # quantized layers count as the weights they replace
    apply_lora(model, rank=16)
    assert count_parameters(model) == (lora16, base + lora16)
    model8 = apply_lora(MistralForCausalLM(ModelArgs()), rank=8)  # an unquantized base counts the same
    lora8, _ = _mistral_7b_counts(8)
    assert count_parameters(model8) == (lora8, base + lora8)
    assert format_trainable(model8) == "trainable: 20,971,520 / 7,262,703,616 (0.29%)"
    assert psutil.Process().memory_info().rss - rss_before < 512 * 2**20


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("rows", [2, 24])
def test_lora_on_a_biased_base(quantized, rows):
    """Qwen2's q/k/v: the base's bias stays frozen and is added once, on the fused (dequantize + matmul)
    and the few-row paths, and ``fuse`` keeps it: ``x @ (W + s B A).T + b``."""
    import mlx.nn as nn

    from mlx_qlora.lora.layer import LoRALinear
    from mlx_qlora.quant.quantized_linear import QuantizedLinear

    mx.random.seed(3)
    linear = nn.Linear(32, 24, bias=True)
    linear.bias = mx.random.normal((24,))
    base = QuantizedLinear.from_linear(linear, bits=4) if quantized else linear
    layer = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    layer.lora_B = mx.random.normal((24, 4)) * 0.1
    weight = base.dequantize(mx.float32) if quantized else linear.weight
    x = mx.random.normal((rows, 32))
    expected = np.array(x) @ np.array(weight + layer.scale * layer.lora_B @ layer.lora_A).T + np.array(linear.bias)
    for training in (True, False):
        layer.train(training)
        np.testing.assert_allclose(np.array(layer(x)), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(layer.fuse()(x)), expected, atol=1e-4, rtol=0)
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["lora_A", "lora_B"]


def test_parameter_count_of_a_biased_model_is_the_original_one(tiny_model):
    """Qwen2's q/k/v biases count once, as parameters, quantized or not."""
    from mlx.utils import tree_flatten

    model = tiny_model(seed=2, model_type="qwen2", sliding_window=None, qkv_bias=True)
    original = sum(v.size for _, v in tree_flatten(model.parameters()))
    quantize_model(model, bits=4)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj",)))
    trainable, total = count_parameters(model)
    assert total == original + trainable
