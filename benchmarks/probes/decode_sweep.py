#!/usr/bin/env python
"""Decoding's GPU time per token under several settings, by part of the layer: one ``kernel_profile.py
decode`` process per setting (the knobs are environment variables, which ``mlx_qlora.settings`` reads
once per process), its kernels summed by what they compute. One command compares block shapes and
unrolling in one lease, where timings between leases differ by more than the changes.

  python benchmarks/probes/decode_sweep.py --preset mistral-7b --json sweep.json \\
      --settings "default;MLX_QLORA_ATTENTION_THREADS=256;MLX_QLORA_ATTENTION_UNROLL=8 MLX_QLORA_ATTENTION_SLOTS=32"

Settings are separated by ``;``; each is ``default`` or space-separated NAME=VALUE pairs. On the CPU nothing
is recorded (the script still runs, as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS, print_table, write_json

HERE = Path(__file__).resolve().parent

# Parts of a decoding token: (column, substring of the kernel's name). The first match counts.
PARTS = [
    ("gate_up", "swiglu"),
    ("o_down", "split1_res"),
    ("qkv", "split3"),
    ("attention_1", "attention_partial"),
    ("attention_2", "attention_combine"),
    ("head", "gemv"),
]


def parse_setting(text: str) -> dict[str, str]:
    """``default`` -> {}; ``A=1 B=2`` -> {"A": "1", "B": "2"}; anything else is an error naming it."""
    text = text.strip()
    if text in ("", "default"):
        return {}
    env = {}
    for pair in text.split():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--settings: {pair!r} is not NAME=VALUE (in {text!r})")
        env[name] = value
    return env


def by_part(rows: list[dict]) -> dict[str, float]:
    """ms per token of each part (and ``other``) from kernel_profile's rows."""
    out = {name: 0.0 for name, _ in PARTS} | {"other": 0.0}
    for row in rows:
        part = next((name for name, key in PARTS if key in row["kernel"]), "other")
        out[part] += row["ms_per_unit"]
    return out


def profile(setting: str, preset: str, tokens: int, layers: int | None) -> dict:
    env = {**os.environ, **parse_setting(setting)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [sys.executable, str(HERE / "kernel_profile.py"), "decode", "--preset", preset, "--tokens", str(tokens),
               "--top", "1000", "--json", str(out)]
        if layers:
            cmd += ["--layers", str(layers)]
        proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{setting!r}: kernel_profile.py failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    row = {"setting": setting.strip() or "default", **by_part(result["rows"])}
    row.update({k: result["totals"][k] for k in ("busy_ms", "wall_ms", "kernels_per_unit")})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--tokens", type=int, default=16, help="tokens profiled per setting")
    p.add_argument("--settings", default="default", help="';'-separated settings (see above)")
    p.add_argument("--json")
    args = p.parse_args()
    settings = [s for s in args.settings.split(";") if s.strip()] or ["default"]
    for s in settings:
        parse_setting(s)  # every setting checked before the first profile
    rows = []
    for s in settings:
        rows.append(profile(s, args.preset, args.tokens, args.layers))
        print(json.dumps(rows[-1]), flush=True)
    columns = [("setting", "setting", "")] + [(name, f"{name} ms", "{:.3f}") for name, _ in PARTS]
    columns += [("other", "other ms", "{:.3f}"), ("busy_ms", "GPU busy ms", "{:.3f}"), ("wall_ms", "wall ms", "{:.3f}"),
                ("kernels_per_unit", "kernels", "{:.0f}")]
    print(f"decoding, {args.preset}, ms per token (kernel_profile.py decode, {args.tokens} tokens per setting)")
    print_table(rows, columns)
    write_json(args.json, {"benchmark": "decode_sweep", "preset": args.preset, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
