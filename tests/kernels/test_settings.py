"""``mlx_qlora.settings``: every ``MLX_QLORA_*`` variable is one field of ``KernelSettings``, parsed and
validated once, overridable in a block; the table in ``docs/ARCHITECTURE.md`` is the dataclass's; nothing
else in the package reads the environment for a fast path, and no document names a variable that does
not exist."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qlora import settings
from mlx_qlora.errors import UserError
from mlx_qlora.settings import KernelSettings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "mlx_qlora"
FIELDS = dataclasses.fields(KernelSettings)
ENV_OF = {f.name: f.metadata["env"] for f in FIELDS}


def test_every_field_has_a_variable_a_kind_and_a_doc():
    names = [f.metadata["env"] for f in FIELDS]
    assert len(set(names)) == len(names) and all(n.startswith("MLX_QLORA_") for n in names)
    assert all(f.metadata["kind"] in (settings.SWITCH, settings.KNOB) and f.metadata["doc"] for f in FIELDS)
    assert settings.from_environment({}) == KernelSettings()  # nothing set: the defaults


def test_the_defaults_are_the_measured_defaults():
    """The values the kernels were measured with (``benchmarks/RESULTS.md``); a change here changes the GPU
    numbers."""
    assert dataclasses.asdict(KernelSettings()) == dict(
        qmv=True, qmv_min_weights=1 << 25, qmv_min_warps=2048, qmv_mma=True, qmv_mma_min_rows=8192,
        qmv_mma_chunks=2, qmv_mma_warps=4, qmv_unroll=4, qmv_stage="norm", qmv_stage_bytes=32 * 1024,
        fused=True, fused_decode=True, lora_scratch=True, prefetch=True, prefetch_blocks=32, prefetch_o=True,
        prefetch_gate_up_mb=4.0, attention_slots=64, attention_threads=256, attention_unroll=8, dequant=True,
        dequant_words=4, expand_group=0, sdpa_pad=True, attention_chunk=1024, attention_chunk_up_to=0, causal_call_pairs=1 << 30, blockwise_from=8192, blockwise_share=0.4, blockwise_block=512, checkpoint_span=0,
        layer_tile=4096, prefill_eval_layers=1, kernel_cache="~/.cache/mlx-qlora/kernels", kernel_image="cubin")


@pytest.mark.parametrize("env,value,field,want", [
    ("MLX_QLORA_QMV", "mlx", "qmv", False), ("MLX_QLORA_QMV", "ours", "qmv", True),
    ("MLX_QLORA_QMV_MMA", "0", "qmv_mma", False), ("MLX_QLORA_QMV_MMA_WARPS", "8", "qmv_mma_warps", 8),
    ("MLX_QLORA_QMV_STAGE", "none", "qmv_stage", "none"), ("MLX_QLORA_PREFETCH", "0", "prefetch", False),
    ("MLX_QLORA_PREFETCH_GATE_UP_MB", "0.5", "prefetch_gate_up_mb", 0.5),
    ("MLX_QLORA_DEQUANT", "mlx", "dequant", False), ("MLX_QLORA_FUSED_DECODE", "0", "fused_decode", False),
    ("MLX_QLORA_LORA_SCRATCH", "0", "lora_scratch", False),
    ("MLX_QLORA_EXPAND_GROUP", "128", "expand_group", 128),
    ("MLX_QLORA_PREFILL_EVAL_LAYERS", "0", "prefill_eval_layers", 0),
    ("MLX_QLORA_SDPA_PAD", "0", "sdpa_pad", False), ("MLX_QLORA_EXPAND_GROUP", "", "expand_group", 0),  # empty: unset
    ("MLX_QLORA_BLOCKWISE_FROM", "0", "blockwise_from", 0), ("MLX_QLORA_BLOCKWISE_SHARE", "0.25", "blockwise_share", 0.25),
    ("MLX_QLORA_BLOCKWISE_BLOCK", "256", "blockwise_block", 256),
    ("MLX_QLORA_ATTENTION_CHUNK", "0", "attention_chunk", 0), ("MLX_QLORA_ATTENTION_CHUNK", "2048", "attention_chunk", 2048),
    ("MLX_QLORA_LAYER_TILE", "0", "layer_tile", 0), ("MLX_QLORA_CHECKPOINT_SPAN", "4", "checkpoint_span", 4),
    ("MLX_QLORA_KERNEL_CACHE", "~/kc", "kernel_cache", "~/kc"),
    ("MLX_QLORA_KERNEL_CACHE", "off", "kernel_cache", "off"),
])
def test_each_variable_sets_its_field(env, value, field, want):
    got = getattr(settings.from_environment({env: value}), field)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("env,value,expected", [
    ("MLX_QLORA_QMV", "on", "expected ours or mlx"),
    ("MLX_QLORA_QMV_STAGE", "all", "expected norm or none"),  # staging every launch: deleted
    ("MLX_QLORA_PREFETCH", "bulk", "expected l2 or 0"),  # bulk prefetches: deleted
    ("MLX_QLORA_FUSED_DECODE", "kernel", "expected 1 or 0"),  # the one-launch layer: deleted
    ("MLX_QLORA_QMV_MMA_WARPS", "3", "expected 1, 2, 4, 8 or 16"),
    ("MLX_QLORA_ATTENTION_SLOTS", "0", "expected an integer > 0"),
    ("MLX_QLORA_QMV_UNROLL", "four", "expected an integer > 0"),
    ("MLX_QLORA_PREFETCH_GATE_UP_MB", "-1", "expected a number >= 0"),
    ("MLX_QLORA_EXPAND_GROUP", "48", "expected 0, 32, 64 or 128"),
    ("MLX_QLORA_ATTENTION_CHUNK", "1000", "expected 0 or a multiple of 128"),  # cuDNN's backward tile
])
def test_a_bad_value_names_the_variable(env, value, expected):
    with pytest.raises(UserError) as info:
        settings.from_environment({env: value})
    assert str(info.value) == f"{env}={value!r}: {expected}"


def test_a_bad_value_stops_a_script_with_one_line_and_status_2(tmp_path):
    code = "from mlx_qlora.errors import run_cli\nfrom mlx_qlora import settings\nrun_cli(settings.current)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(PACKAGE.parent), "MLX_QLORA_QMV_STAGE": "all",
                               "MLX_QLORA_BLAS": "reference"})
    assert proc.returncode == 2
    assert proc.stderr == "error: MLX_QLORA_QMV_STAGE='all': expected norm or none\n"


def test_the_environment_is_read_once(monkeypatch):
    monkeypatch.setattr(settings, "_from_env", None)  # as in a fresh process
    monkeypatch.setenv("MLX_QLORA_QMV_UNROLL", "2")
    assert settings.current().qmv_unroll == 2
    monkeypatch.setenv("MLX_QLORA_QMV_UNROLL", "8")
    assert settings.current().qmv_unroll == 2  # kept from the first read
    assert settings.current() is settings.current()


def test_override_nests_validates_and_restores():
    before = settings.current()
    with settings.override(qmv_unroll=2, prefetch=False) as outer:
        assert settings.current() is outer and outer.qmv_unroll == 2 and not outer.prefetch
        with settings.override(qmv_unroll=8):
            assert settings.current().qmv_unroll == 8 and not settings.current().prefetch
        assert settings.current().qmv_unroll == 2
    assert settings.current() is before
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['qmv_stages'\]"):
        with settings.override(qmv_stages="none"):
            pass
    with pytest.raises(ValueError, match=r"setting qmv_stage \(MLX_QLORA_QMV_STAGE\): 'all' is not norm or none"):
        with settings.override(qmv_stage="all"):
            pass
    with pytest.raises(ValueError, match="attention_threads"):
        with settings.override(attention_threads=100):
            pass
    with pytest.raises(ValueError, match="fused"):
        with settings.override(fused=1):  # a bool field takes bools only
            pass
    assert settings.current() is before
    with pytest.raises(RuntimeError):  # an error inside the block restores the settings too
        with settings.override(qmv_unroll=2):
            raise RuntimeError
    assert settings.current() is before


def test_the_docs_table_is_the_dataclass():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    start = "<!-- settings table: generated by `python -m mlx_qlora.settings`; do not edit by hand -->\n"
    table = doc[doc.index(start) + len(start):doc.index("<!-- end of settings table -->")]
    assert table == settings.environment_table(), "run `python -m mlx_qlora.settings` and paste its table"
    for f in FIELDS:  # each field's row names its variable, its field and its default
        row = next(line for line in table.splitlines() if line.startswith(f"| `{f.metadata['env']}` |"))
        assert f"| `{f.name}` |" in row
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == (
        [f.metadata["env"] for f in FIELDS] + [v.env for v in settings.OTHER_VARIABLES])


def test_the_other_variables_are_read_where_the_table_says():
    from mlx_qlora.train import run_ahead

    assert run_ahead.ENV == "MLX_MAX_MB_PER_BUFFER"
    blas = (PACKAGE / "blas.py").read_text(encoding="utf-8")
    assert '"MLX_QLORA_BLAS"' in blas and '"MLX_QLORA_OPENBLAS"' in blas
    assert [v.env for v in settings.OTHER_VARIABLES] == ["MLX_MAX_MB_PER_BUFFER", "MLX_QLORA_BLAS",
                                                         "MLX_QLORA_OPENBLAS"]


def test_only_the_settings_read_the_environment():
    """No ``MLX_QLORA_*`` name appears as a string in the package's code outside ``settings.py`` and
    ``blas.py`` (whose variables are read before MLX loads), and the fast paths' packages (``kernels``,
    ``quant``, ``model``) touch no ``os.environ``."""
    names, readers = [], []
    for file in PACKAGE.rglob("*.py"):
        rel = file.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"MLX_QLORA_[A-Z0-9_]+", node.value) and rel not in ("settings.py", "blas.py")):
                names.append(f"{rel}: {node.value}")
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and rel.split("/")[0] in ("kernels", "quant", "model")):
                readers.append(rel)
    assert not names and not readers, (names, readers)


def test_no_file_names_a_variable_that_does_not_exist():
    """Every ``MLX_QLORA_*`` name in the package, the docs, the README and the benchmarks' code is a
    documented variable (``MLX_QLORA_MMA_DEFINED`` is a C macro of the kernels' header)."""
    known = set(ENV_OF.values()) | {v.env for v in settings.OTHER_VARIABLES} | {"MLX_QLORA_MMA_DEFINED"}
    files = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.cu"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md",
             *(ROOT / "benchmarks").rglob("*.py")]
    unknown = {(f.relative_to(ROOT).as_posix(), name) for f in files
               for name in re.findall(r"MLX_QLORA_[A-Z0-9_]*[A-Z0-9]", f.read_text(encoding="utf-8"))
               if name not in known}
    assert not unknown, sorted(unknown)
