"""``train/run_ahead.py``: the GPU queue bound is set only for checkpointed training on CUDA, before MLX
reads it, and never over a value the user chose."""

from mlx_qlora.train import run_ahead


def test_nothing_changes_on_the_cpu(monkeypatch):
    monkeypatch.delenv(run_ahead.ENV, raising=False)
    assert run_ahead.bound_run_ahead(True) is None
    import os

    assert run_ahead.ENV not in os.environ


def test_set_for_checkpointing_on_cuda(monkeypatch):
    import os

    monkeypatch.setattr(run_ahead, "on_cuda", lambda: True)
    monkeypatch.delenv(run_ahead.ENV, raising=False)
    assert run_ahead.bound_run_ahead(False) is None and run_ahead.ENV not in os.environ
    assert run_ahead.bound_run_ahead(True) == run_ahead.CHECKPOINTING_MB
    assert os.environ[run_ahead.ENV] == str(run_ahead.CHECKPOINTING_MB)


def test_a_value_in_the_environment_wins(monkeypatch):
    import os

    monkeypatch.setattr(run_ahead, "on_cuda", lambda: True)
    monkeypatch.setenv(run_ahead.ENV, "64")
    assert run_ahead.bound_run_ahead(True) is None
    assert os.environ[run_ahead.ENV] == "64"
