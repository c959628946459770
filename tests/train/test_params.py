"""``train/params.py``: direct access to the trainable arrays agrees with the module tree."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_qlora.config import LoRAConfig
from mlx_qlora.lora import apply_lora
from mlx_qlora.train.params import TrainableSlots


@pytest.fixture
def model(tiny_model):
    """Two layers with rank-4 adapters on all seven projections, the base frozen."""
    model = tiny_model(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    model.freeze()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    return model


def test_slots_read_and_write_what_the_module_tree_holds(model):
    slots = TrainableSlots(model)
    want = dict(tree_flatten(model.trainable_parameters()))
    got = slots.get()
    assert list(got) == list(want) and len(got) == 2 * 2 * 7  # A and B of seven projections, two layers
    assert all(got[k] is want[k] for k in want)
    new = {k: v + i for i, (k, v) in enumerate(got.items())}
    slots.set(new)
    after = dict(tree_flatten(model.trainable_parameters()))
    assert list(after) == list(want) and all(after[k] is new[k] for k in new)
    assert all(mx.array_equal(v, model.parameters()["model"]["layers"][0]["self_attn"]["q_proj"][k.split(".")[-1]])
               for k, v in new.items() if k.startswith("model.layers.0.self_attn.q_proj."))
    # frozen weights are not slots, and stay frozen
    assert not any(k.endswith(".weight") for k in got)
    assert set(dict(tree_flatten(model.trainable_parameters()))) == set(want)


def test_setting_a_frozen_or_unknown_path_is_refused(model):
    slots = TrainableSlots(model)
    with pytest.raises(KeyError, match="q_proj.base.weight"):
        slots.set({"model.layers.0.self_attn.q_proj.base.weight": mx.zeros((1,))})
