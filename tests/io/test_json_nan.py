"""JSON has no NaN or infinity: ``atomic_write_json`` refuses them instead of writing a file that strict
parsers (and ``jq``, browsers, other languages) cannot read, and leaves nothing behind."""

import json
import math

import pytest

from mlx_qlora.io import atomic_write_json, json_line


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_and_nothing_is_written(tmp_path, value):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(path, {"overall": {"rougeL": value}})
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(path, {"overall": {"rougeL": 0.5}})
    assert json.loads(path.read_text()) == {"overall": {"rougeL": 0.5}}


def test_json_line_writes_non_finite_numbers_as_null():
    """A metrics row keeps every other value exactly; NaN and infinities, at any depth, become null, so the
    line stays JSON that any reader parses (``json.loads`` here with NaN literals refused)."""
    record = {"step": 3, "loss": float("nan"), "lr": 2e-4,
              "ranks": [{"tokens_per_s": float("inf")}, {"tokens_per_s": 10.5}], "note": "ok"}
    line = json_line(record)
    assert "\n" not in line
    parsed = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert parsed == {"step": 3, "loss": None, "lr": 2e-4,
                      "ranks": [{"tokens_per_s": None}, {"tokens_per_s": 10.5}], "note": "ok"}
