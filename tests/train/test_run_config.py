"""finetune.py's configuration: defaults < --config file < flags, durations, and clear errors."""

import pytest

from mlx_qlora.config import ALL_TARGETS
from mlx_qlora.errors import UserError
from mlx_qlora.train.run_config import parse_duration, resolve_config


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 8\nlearning_rate: 1.0e-3\nlora_rank: 4\nlora:\n  alpha: 8\n  dropout: 0.05\n")
    config = resolve_config({"batch_size": 2, "lora_targets": "q_proj,v_proj", "iters": None}, str(path))
    assert config.batch_size == 2  # flag
    assert config.learning_rate == 1e-3  # file
    assert config.grad_accum == 1  # default
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (4, 8, 0.05)
    assert config.lora.targets == ("q_proj", "v_proj")
    assert config.lora.scale == 2.0  # alpha / rank
    assert resolve_config({}).lora.targets == ALL_TARGETS


def test_json_config_and_rslora_scale(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"lora": {"rank": 16, "alpha": 32, "use_rslora": true}, "schedule": "linear"}')
    config = resolve_config({}, str(path))
    assert config.schedule == "linear"
    assert config.lora.scale == pytest.approx(32 / 4)  # alpha / sqrt(rank)


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_sise: 4\n", r"run\.yaml: unknown TrainConfig key\(s\): batch_sise"),
        ("learning_rate: -1\n", r"run\.yaml: learning_rate must be > 0"),
        ("lora_targets: q_proj,w_proj\n", r"run\.yaml: unknown lora target\(s\) \['w_proj'\]"),
        ("- a\n- b\n", r"run\.yaml: expected a mapping"),
        ("batch_size: [\n", r"run\.yaml: cannot be parsed"),
    ],
)
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        resolve_config({}, str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        resolve_config({}, str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration():
    with pytest.raises(UserError, match="max_time: cannot read '2 hours'"):
        parse_duration("2 hours")
