"""JSON has no NaN or infinity: ``atomic_write_json`` refuses them instead of writing a file that strict
parsers (and ``jq``, browsers, other languages) cannot read, and leaves nothing behind."""

import json
import math

import pytest

from mlx_qlora.io import atomic_write_json


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_and_nothing_is_written(tmp_path, value):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(path, {"overall": {"rougeL": value}})
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(path, {"overall": {"rougeL": 0.5}})
    assert json.loads(path.read_text()) == {"overall": {"rougeL": 0.5}}
