"""Each default is written once, in a config dataclass: the commands' flags default to None, their help shows
the dataclass's value, and a command run without a flag hands the library the dataclass's value."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mlx_qlora import cli
from mlx_qlora.cli.flags import shown
from mlx_qlora.config import (ConvertConfig, DataConfig, DemoConfig, EvalConfig, LoRAConfig, MergeConfig,
                              SourceConfig, TrainConfig)
from mlx_qlora.generate.chat import ChatSession
from mlx_qlora.generate.sampling import SamplerConfig
from mlx_qlora.train.run_config import LORA_FLAGS

# Switches: their absence is the default, which the flag's name says (--no-check, --packing).
SWITCHES = (argparse._HelpAction, argparse._StoreTrueAction)

# Where each command's flags take their defaults: flag dest -> (dataclass, field).
SOURCES = {
    "convert": {f: (ConvertConfig, f) for f in ("bits", "group_size", "dtype", "shard_size_gb")},
    "prepare": {**{f.name: (DataConfig, f.name) for f in dataclasses.fields(DataConfig)},
                "source_split": (SourceConfig, "split")},
    "finetune": {**{f.name: (TrainConfig, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "lora"},
                 **{flag: (LoRAConfig, name) for flag, name in LORA_FLAGS.items()}},
    "generate": {**{f.name: (SamplerConfig, f.name) for f in dataclasses.fields(SamplerConfig)},
                 **{f: (ChatSession, f) for f in ("max_tokens", "seed", "stop")}},
    "merge": {f.name: (MergeConfig, f.name) for f in dataclasses.fields(MergeConfig)},
    "evaluate": {f.name: (EvalConfig, f.name) for f in dataclasses.fields(EvalConfig)},
    "demo": {f.name: (DemoConfig, f.name) for f in dataclasses.fields(DemoConfig)},
}


def field_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def options(command):
    return [a for a in cli.command_module(command).build_parser()._actions if a.option_strings]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_value_flags_default_to_none(command):
    """No flag carries a default of its own: every flag that takes a value (or sets one, --grad-checkpoint,
    --overlap-steps) defaults to None, "not given"."""
    with_default = [a.dest for a in options(command) if not isinstance(a, SWITCHES) and a.default is not None]
    assert with_default == []


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_the_dataclass_default(command):
    dests = {a.dest for a in options(command)}
    assert set(SOURCES[command]) & dests, "the table above maps none of this command's flags"
    checked = 0
    for action in options(command):
        if action.dest not in SOURCES[command]:
            continue
        value = field_default(*SOURCES[command][action.dest])
        if value in (None, "") or isinstance(value, (bool, tuple)):
            continue  # shown in words ("default: the base's", "default all seven"), or a required setting
        assert f"default {shown(value)}" in action.help, (action.dest, action.help)
        checked += 1
    assert checked >= 1


def test_shown_is_exact():
    for value in (2e-4, 1e-3, 0.05, 1.0, 32.0, 0.0, 3.0):
        assert float(shown(value)) == value
    assert shown(2e-4) == "2e-4" and shown(0.05) == "0.05" and shown(1.0) == "1.0" and shown(16) == "16"


def test_finetune_without_flags_resolves_to_the_dataclass_defaults():
    from mlx_qlora.cli.finetune import build_parser
    from mlx_qlora.train.run_config import resolve_config

    args = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "no_progress")}
    assert resolve_config(flags).to_dict() == TrainConfig(model="m", data="d", out="o").to_dict()
    args = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--lora-rank", "4",
                                      "--learning-rate", "1e-3", "--no-overlap-steps"])
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "no_progress")}
    config = resolve_config(flags)
    assert (config.lora.rank, config.learning_rate, config.overlap_steps) == (4, 1e-3, False)
    assert config.lora.alpha == LoRAConfig().alpha and config.batch_size == TrainConfig().batch_size


CONVERT = "mlx_qlora.convert.convert_checkpoint"


class Called(Exception):
    """Raised by a stand-in library function with the arguments it was given."""


def record(*args, **kwargs):
    raise Called(args, kwargs)


def called_with(monkeypatch, target: str, main, argv, stand_in=record, positional=False):
    """The keyword arguments (and with ``positional`` the positional ones) that ``main(argv)`` gives ``target``."""
    monkeypatch.setattr(target, stand_in)
    with pytest.raises(Called) as call:
        main(argv)
    args, kwargs = call.value.args
    return (args, kwargs) if positional else kwargs


def test_convert_passes_the_dataclass_defaults(monkeypatch):
    from mlx_qlora.cli.convert import main

    kwargs = called_with(monkeypatch, CONVERT, main, ["--hf-path", "a", "--mlx-path", "b"])
    d = ConvertConfig()
    assert (kwargs["bits"], kwargs["group_size"], kwargs["dtype"]) == (d.bits, d.group_size, d.dtype)
    assert kwargs["shard_bytes"] == 3 * 2**30 and (kwargs["quantize"], kwargs["verify"], kwargs["overwrite"]) == (
        True, True, False)
    kwargs = called_with(monkeypatch, CONVERT, main,
                         ["--hf-path", "a", "--mlx-path", "b", "--bits", "8", "--group-size", "64",
                          "--shard-size-gb", "0.5", "--no-quantize"])
    assert (kwargs["bits"], kwargs["group_size"], kwargs["shard_bytes"], kwargs["quantize"]) == (8, 64, 2**29, False)


def test_convert_group_size_row_is_a_value_not_a_missing_flag(monkeypatch):
    """``--group-size row`` parses to None, which must reach the library as "per row" whatever the default is."""
    from mlx_qlora.cli.convert import main

    monkeypatch.setattr(ConvertConfig, "__init__", _with_default(ConvertConfig, group_size=64))
    kwargs = called_with(monkeypatch, CONVERT, main,
                         ["--hf-path", "a", "--mlx-path", "b", "--group-size", "row"])
    assert kwargs["group_size"] is None
    kwargs = called_with(monkeypatch, CONVERT, main, ["--hf-path", "a", "--mlx-path", "b"])
    assert kwargs["group_size"] == 64


def _with_default(cls, **defaults):
    """``cls.__init__`` with other defaults for some fields (a dataclass whose default was edited)."""
    init = cls.__init__

    def patched(self, **values):
        init(self, **{**defaults, **values})

    return patched


def test_evaluate_and_merge_pass_the_dataclass_defaults(monkeypatch):
    from mlx_qlora.cli.evaluate import main as evaluate_main
    from mlx_qlora.cli.merge import main as merge_main

    kwargs = called_with(monkeypatch, "mlx_qlora.generate.evaluate.evaluate", evaluate_main,
                         ["--model", "m", "--data", "d", "--out", "o"])
    assert {k: kwargs[k] for k in ("split", "max_examples", "max_tokens", "batch_size")} == EvalConfig().to_dict()
    kwargs = called_with(monkeypatch, "mlx_qlora.generate.merge.merge_adapters", merge_main,
                         ["--model", "m", "--adapter", "a", "--out", "o"])
    assert {k: kwargs[k] for k in ("dtype", "max_shard_size", "group_size", "gguf_type")} == MergeConfig().to_dict()
    kwargs = called_with(monkeypatch, "mlx_qlora.generate.merge.merge_adapters", merge_main,
                         ["--model", "m", "--adapter", "a", "--out", "o", "--gguf-type", "q8_0",
                          "--max-shard-size", "1GB"])
    assert (kwargs["gguf_type"], kwargs["max_shard_size"]) == ("q8_0", "1GB")


def test_generate_builds_the_sampler_and_session_from_the_dataclasses(monkeypatch):
    from mlx_qlora.cli.generate import main

    monkeypatch.setattr("mlx_qlora.generate.loading.load_for_inference", lambda *a: ("model", "tokenizer", None))
    monkeypatch.setattr("mlx_qlora.generate.loading.resolve_template", lambda *a: ("dolly", "test"))

    class Session(ChatSession):  # still a dataclass for the help's defaults; records its arguments
        def __init__(self, *args, **kwargs):
            raise Called(args, kwargs)

    target = "mlx_qlora.generate.chat.ChatSession"
    args, kwargs = called_with(monkeypatch, target, main, ["--model", "m", "--prompt", "hi"], Session, True)
    # Not given: ChatSession's own defaults apply (max_tokens, stop, seed are not passed).
    assert args == ("model", "tokenizer", "dolly") and kwargs == {"sampler": SamplerConfig()}
    kwargs = called_with(monkeypatch, target, main,
                         ["--model", "m", "--temperature", "0.7", "--top-k", "5", "--stop", "x", "--stop", "y",
                          "--max-tokens", "9", "--seed", "3"], Session)
    assert kwargs["sampler"] == SamplerConfig(temperature=0.7, top_k=5)
    assert (kwargs["stop"], kwargs["max_tokens"], kwargs["seed"]) == (["x", "y"], 9, 3)


def test_prepare_reads_the_given_split_and_the_shipped_sample(monkeypatch):
    from mlx_qlora.cli.prepare import main
    from mlx_qlora.tiny import SAMPLE_DATA

    monkeypatch.setattr("mlx_qlora.data.load_tokenizer", lambda path: path)
    args, kwargs = called_with(monkeypatch, "mlx_qlora.data.load_records", main, ["--tokenizer", "t", "--out", "o"],
                               positional=True)
    assert args == (str(SAMPLE_DATA),) and SAMPLE_DATA.is_file()
    assert kwargs["split"] == SourceConfig().split
    kwargs = called_with(monkeypatch, "mlx_qlora.data.load_records", main,
                         ["--tokenizer", "t", "--out", "o", "--source-split", "test", "--dataset", "x.jsonl"])
    assert kwargs["split"] == "test"
