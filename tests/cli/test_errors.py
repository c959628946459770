"""The commands' error contract (``mlx_qlora.errors``): a user error is one line ``error: ...`` on standard
error and exit status 2, with nothing written; Ctrl-C exits 130, a closed standard output 141 in silence.

Classes covered here, one test (or one parametrized test) each: numbers checked where they are parsed
(flags and --config files alike), weights with NaN/inf refused by every command that reads them, failures
that used to end in a traceback (a truncated checkpoint, an unsupported quantization, a read-only or full
output folder, an output path that is a file, text that is not UTF-8), standard streams closed, a closed
pipe, and ``run_cli``'s handling of each kind of exception. The check behind each lives in its package and
has its own tests there (``tests/model/test_loading.py``, ``tests/lora``, ``tests/generate``, ``tests/io``).
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora import cli
from mlx_qlora.config import DataConfig, number
from mlx_qlora.data.prepare import prepare_dataset
from mlx_qlora.errors import UserError, run_cli
from mlx_qlora.model import ModelArgs
from mlx_qlora.train.run_config import resolve_config
from support import write_adapters

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
NO_CAPABILITY = 77  # the child's exit status when it could not give up root's right to ignore permissions


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dirs):
    """The tiny model (full and 4-bit, with its tokenizer), prepared data, a run folder of adapters, and a
    copy of the full model whose down_proj of layer 1 holds one NaN."""
    root = tmp_path_factory.mktemp("errors")
    full, quant = tiny_model_dirs["full"], tiny_model_dirs["quant"]
    data = root / "data"
    prepare_dataset(SAMPLE, full / "tokenizer.model", data, DataConfig(max_seq_len=96, val_fraction=0.1))
    args = ModelArgs.from_hf_config(json.loads((full / "config.json").read_text()))
    run = write_adapters(root / "run", args)
    nan = root / "nan"
    shutil.copytree(full, nan)
    tensors = mx.load(str(nan / "model.safetensors"))
    weight = tensors["model.layers.1.mlp.down_proj.weight"]
    weight[3, 5] = float("nan")
    tensors["model.layers.1.mlp.down_proj.weight"] = weight
    mx.save_safetensors(str(nan / "model.safetensors"), tensors, metadata={"format": "pt"})
    return {"full": full, "quant": quant, "data": data, "run": run, "nan": nan}


def run_main(command: str, argv, capsys) -> tuple[int, str, str]:
    """Run ``mlx-qlora <command> <argv>`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        cli.command_module(command).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def assert_one_line_error(code: int, err: str, *words: str, only_line: bool = True) -> str:
    """Exit status 2 and an ``error:`` line naming ``words``, no traceback; with ``only_line`` nothing else
    on standard error (the error came before any work)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    if only_line:
        assert len(lines) == 1, err
    for word in words:
        assert word in lines[-1], (word, err)
    return lines[-1]


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (``.name.xxxxxxxx.tmp``) anywhere under ``folder``."""
    return [str(p) for p in folder.rglob(".*") if ".tmp" in p.name]


def script(name: str, *args, preexec_fn=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec_fn, **kwargs)


# ---- numbers are checked where they are parsed ---------------------------------------------------------------


def _base_args(command: str, ws, out: Path) -> list:
    """Arguments that make ``command`` run for real on the tiny model: a late check would do work first."""
    return {
        "finetune": ["--model", ws["quant"], "--data", ws["data"], "--out", out, "--iters", 2, "--no-progress"],
        "convert": ["--hf-path", ws["full"], "--mlx-path", out],
        "generate": ["--model", ws["full"], "--prompt", "hi", "--max-tokens", 2],
        "evaluate": ["--model", ws["full"], "--data", ws["data"], "--out", out, "--max-tokens", 2, "--no-progress"],
        "merge": ["--model", ws["quant"], "--adapter", ws["run"], "--out", out, "--no-check"],
        "prepare": ["--tokenizer", ws["full"], "--out", out, "--no-progress"],
        "demo": ["--out", out],
    }[command]


@pytest.mark.parametrize("command, flags, key", [
    ("finetune", ["--learning-rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
    ("finetune", ["--learning-rate", "inf"], "learning_rate"),
    ("finetune", ["--max-grad-norm", "-1"], "max_grad_norm must be >= 0, got -1"),
    ("finetune", ["--lora-alpha", "nan"], "lora alpha"),
    ("finetune", ["--epochs", "nan"], "epochs"),
    ("finetune", ["--weight-decay", "-0.1"], "weight_decay"),
    ("finetune", ["--warmup-steps", "-1"], "warmup_steps"),
    ("finetune", ["--eval-batches", "0"], "eval_batches"),
    ("finetune", ["--seed", "-1"], "seed"),
    ("finetune", ["--max-time", "0s"], "max_time"),
    ("convert", ["--shard-size-gb", "nan"], "shard_size_gb must be a finite number > 0, got nan"),
    ("convert", ["--shard-size-gb", "0"], "shard_size_gb must be > 0"),
    ("generate", ["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    ("generate", ["--top-p", "nan"], "top_p"),
    ("generate", ["--min-p", "inf"], "min_p"),
    ("generate", ["--repetition-penalty", "inf"], "repetition_penalty"),
    ("generate", ["--max-tokens", "0"], "max_tokens"),
    ("generate", ["--seed", "-1"], "seed"),
    ("evaluate", ["--max-examples", "-1"], "max_examples must be >= 1, got -1"),
    ("evaluate", ["--max-examples", "0"], "max_examples"),
    ("evaluate", ["--batch-size", "0"], "batch_size"),
    ("merge", ["--max-shard-size", "0"], "max_shard_size"),
    ("merge", ["--group-size", "48"], "group_size"),
    ("prepare", ["--val-fraction", "nan"], "val_fraction"),
    ("prepare", ["--seed", "-1"], "seed"),
    ("demo", ["--iters", "0"], "iters"),
])
def test_bad_numbers_are_one_line_before_any_work(command, flags, key, ws, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(command, _base_args(command, ws, out) + flags, capsys)
    assert_one_line_error(code, err, key)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, message", [
    ("learning_rate: .nan\n", r"run\.yaml: learning_rate must be a finite number > 0, got nan"),
    ("max_grad_norm: -1\n", r"run\.yaml: max_grad_norm must be >= 0, got -1"),
    ("lora:\n  alpha: .inf\n", r"run\.yaml: lora alpha must be a finite number > 0, got inf"),
    ("iters: 2.5\n", r"run\.yaml: iters must be a whole number >= 1, got 2\.5"),
    ("batch_size: true\n", r"run\.yaml: batch_size must be a whole number >= 1, got True"),
    ("learning_rate: fast\n", r"run\.yaml: learning_rate must be a number > 0, got 'fast'"),
    ("lora: 5\n", r"run\.yaml: lora must be a mapping of LoRA settings"),
    ("1: 2\n", r"run\.yaml: key 1 is not a setting name"),
])
def test_config_files_get_the_flags_checks(text, message, tmp_path):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        resolve_config({}, str(tmp_path / "run.yaml"))


def test_yaml_exponents_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads ``2e-4`` as a string: it is the number the user meant."""
    (tmp_path / "run.yaml").write_text("learning_rate: 2e-4\nweight_decay: 1e-2\n")
    config = resolve_config({}, str(tmp_path / "run.yaml"))
    assert (config.learning_rate, config.weight_decay) == (2e-4, 1e-2)


def test_number_rules():
    assert number("k", 3, integer=True, at_least=1) == 3
    assert number("k", 4.0, integer=True) == 4 and isinstance(number("k", 4.0, integer=True), int)
    assert number("k", None, optional=True) is None
    assert number("k", 0, at_least=0, below=1) == 0
    for value, kwargs, message in [
        (float("nan"), dict(at_least=0), "k must be a finite number >= 0, got nan"),
        (float("-inf"), {}, "k must be a finite number, got -inf"),
        (1, dict(at_least=0, below=1), r"k must be in \[0, 1\), got 1"),
        (0, dict(above=0, at_most=1), r"k must be in \(0, 1\], got 0"),
        (None, {}, "k must be a number, got None"),
        (True, dict(integer=True), "k must be a whole number, got True"),
    ]:
        with pytest.raises(ValueError, match=message):
            number("k", value, **kwargs)


# ---- weights are checked where they are read -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "evaluate", "finetune", "merge", "convert", "merge-base"])
def test_nan_weights_are_refused_by_every_command(command, ws, tmp_path, capsys):
    nan, out = ws["nan"], tmp_path / "out"
    argv = {
        "generate": ["--model", nan, "--prompt", "hi"],
        "evaluate": ["--model", nan, "--data", ws["data"], "--out", out, "--no-progress"],
        "finetune": ["--model", nan, "--data", ws["data"], "--out", out, "--iters", 2, "--no-progress"],
        "merge": ["--model", nan, "--adapter", ws["run"], "--out", out],
        "merge-base": ["--model", ws["quant"], "--adapter", ws["run"], "--base-weights", nan, "--out", out],
        "convert": ["--hf-path", nan, "--mlx-path", out],
    }[command]
    code, _, err = run_main(command.split("-")[0], argv, capsys)
    assert_one_line_error(code, err, str(nan / "model.safetensors"), "model.layers.1.mlp.down_proj.weight",
                          "NaN", only_line=False)
    assert not out.exists() and hidden_leftovers(tmp_path) == []


# ---- what used to end in a traceback -----------------------------------------------------------------------


def test_truncated_checkpoint(ws, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ws["full"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run_main("convert", ["--hf-path", broken, "--mlx-path", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, str(broken / "model.safetensors"), "truncated")
    assert not (tmp_path / "out").exists()
    code, _, err = run_main("generate", ["--model", broken, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, str(broken / "model.safetensors"), "cannot be read")


@pytest.mark.parametrize("quantization, words", [
    ({"bits": 3, "group_size": None}, "quantization: bits: 3 is not supported"),
    ({"bits": 4, "group_size": 48}, "quantization: group_size"),
    ({"bits": "four", "group_size": None}, "quantization:"),
])
def test_unsupported_quantization_in_config(quantization, words, ws, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ws["quant"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization"].update(quantization)
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run_main("generate", ["--model", model, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, str(model / "config.json"), words)


def _without_root_override():
    """In the child: as root, give up the right to ignore file permissions (from the capability bounding
    set, which is what root keeps across exec), so a read-only folder is read-only."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            os._exit(NO_CAPABILITY)


def _output_args(command: str, ws, out: Path) -> list:
    return {
        "prepare_data.py": ["--tokenizer", ws["full"], "--out", out, "--no-progress"],
        "finetune.py": ["--model", ws["quant"], "--data", ws["data"], "--out", out, "--iters", 2, "--no-progress",
                        "--save-every", 1],
        "merge_adapters.py": ["--model", ws["quant"], "--adapter", ws["run"], "--out", out, "--no-check"],
        "evaluate.py": ["--model", ws["quant"], "--data", ws["data"], "--out", out, "--max-examples", 2,
                        "--max-tokens", 2, "--no-progress"],
    }[command]


@pytest.mark.parametrize("command", ["prepare_data.py", "finetune.py", "merge_adapters.py", "evaluate.py"])
def test_read_only_output_folder(command, ws, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = script(command, *_output_args(command, ws, parent / "out"), preexec_fn=_without_root_override)
    finally:
        parent.chmod(0o755)
    if proc.returncode == NO_CAPABILITY:
        pytest.skip("running as root without the capability to give up CAP_DAC_OVERRIDE")
    # refused when the output is claimed (before any work) or, past that, when writing: either says so
    line = assert_one_line_error(proc.returncode, proc.stderr, str(parent / "out"), only_line=False)
    assert "permission denied" in line.lower(), line
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("command, limit", [
    ("prepare_data.py", 4096),  # safetensors' writer: SafetensorError
    ("finetune.py", 4096),  # MLX's writer: RuntimeError "[write] ..."
    ("merge_adapters.py", 65536),
    ("evaluate.py", 64),  # Python's: OSError without a file name
])
def test_full_disk(command, limit, ws, tmp_path):
    """A file-size limit (``ulimit -f``) makes writes fail as a full disk does, with EFBIG instead of ENOSPC."""
    out = tmp_path / "out"
    proc = script(command, *_output_args(command, ws, out),
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = assert_one_line_error(proc.returncode, proc.stderr, only_line=False)
    assert "File too large" in proc.stderr or "Unable to write" in proc.stderr
    if command == "evaluate.py":  # Python's write() names no file: the atomic write names its output
        assert str(out) in line, line
    assert hidden_leftovers(tmp_path) == []
    if command in ("prepare_data.py", "merge_adapters.py"):  # one folder, renamed into place when whole
        assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_output_path_that_is_a_file(command, ws, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    argv = _output_args(f"{command}.py", ws, out)
    code, _, err = run_main(command, argv, capsys)
    assert_one_line_error(code, err, str(out), only_line=False)
    assert out.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_prompt_that_is_not_utf8(ws, capsys):
    """Python turns bytes of the command line that are not UTF-8 into lone surrogates."""
    code, _, err = run_main("generate", ["--model", ws["full"], "--prompt", os.fsdecode(b"caf\xe9")], capsys)
    assert_one_line_error(code, err, "prompt: not UTF-8 text (byte 0xe9 at character 4)", only_line=False)


def test_chat_input_that_is_not_utf8_is_one_line_and_the_chat_goes_on(ws):
    from mlx_qlora.generate.chat import ChatSession, chat_loop
    from mlx_qlora.generate.loading import load_for_inference

    model, tokenizer, _ = load_for_inference(ws["full"])
    session = ChatSession(model, tokenizer, "dolly", max_tokens=2)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nhello\n"), encoding="utf-8", errors="strict")
    out = io.StringIO()
    chat_loop(session, stdin, out, interactive=False)
    lines = out.getvalue().splitlines()
    assert "error: prompt: not UTF-8 text (byte 0xe9 at character 4)" in lines
    assert ">>> hello" in lines and session.turns == 1


# ---- standard streams, pipes, interrupts -------------------------------------------------------------------


@pytest.mark.parametrize("redirect", ["<&-", ">&-"])
def test_closed_standard_streams(redirect, ws):
    """``<&-`` used to make every weight file unreadable: the next file opened got descriptor 0."""
    command = (f"exec {sys.executable} {ROOT / 'scripts' / 'generate.py'} --model {ws['quant']} --prompt hi "
               f"--max-tokens 2 --no-template {redirect}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr and "[length]" in proc.stderr


def test_closed_pipe_is_quiet(ws):
    """``generate.py ... | head -c1``: the reader is gone before the reply; exit 141 (128 + SIGPIPE), silent."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(ws["quant"]),
                             "--prompt", "hi", "--max-tokens", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "error" not in err and "Exception ignored" not in err


# ---- run_cli on each kind of exception ---------------------------------------------------------------------


def _raising(error: BaseException):
    def main():
        raise error
    return main


@pytest.mark.parametrize("error, status, line", [
    (UserError("data.jsonl, line 3: key 'response'\nmust be a string"), 2,
     "error: data.jsonl, line 3: key 'response' must be a string"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/.results.json.ab3_9xyz.tmp"), 2,
     "error: /runs/results.json: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), 2,
     "error: reading or writing a file failed: No space left on device (the disk is full)"),
    (RuntimeError("[write] Unable to write 300092 bytes to file."), 2,
     "error: writing a file failed: [write] Unable to write 300092 bytes to file."),
    (KeyboardInterrupt(), 130, "interrupted"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141, ""),
])
def test_run_cli_statuses(error, status, line, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(_raising(error))
    assert stop.value.code == status
    assert capsys.readouterr().err.strip() == line


COMPILE_UNDER_LIMIT = """
import resource, sys
import mlx.core as mx
from mlx_qlora.errors import run_cli
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
mx.set_default_device(mx.cpu)
run_cli(lambda: mx.eval(mx.compile(lambda x: mx.exp(x) * 3.0 + x)(mx.ones((8,)))))
"""


def test_mlx_compiling_onto_a_full_disk_is_one_line(tmp_path):
    """MLX's CPU backend compiles fused operations with the C++ compiler into a folder under $TMPDIR; a
    full disk there (a file-size limit here, on a cold folder) fails inside ``mx.eval`` with the compiler's
    whole output. That is one line naming the folder and the reason."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", COMPILE_UNDER_LIMIT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert line.startswith(f"error: writing a file failed: MLX could not write the code it compiles into {tmp}")
    assert line.endswith(": File too large"), line


def test_run_cli_lets_our_bugs_show_their_traceback():
    with pytest.raises(RuntimeError, match="something else"):
        run_cli(_raising(RuntimeError("something else")))
    with pytest.raises(ZeroDivisionError):
        run_cli(_raising(ZeroDivisionError()))
