"""Training checkpoints (training/checkpointing.py) outside of torchrun."""

import sys

import pytest

from megatron_dots.training import checkpointing


def test_save_refuses_to_start_without_psutil(monkeypatch, tmp_path):
    # Without psutil megatron-core's torch_dist writer hangs forever; we fail fast instead.
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(RuntimeError, match="needs psutil"):
        checkpointing.save_checkpoint([], str(tmp_path), 1, cfg=None)
    assert not list(tmp_path.iterdir())
