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


def test_damage_the_checks_cannot_see_is_reported_naming_the_checkpoint(seeded, tmp_path):
    """Bytes changed inside a stored tensor record of a checkpoint without a manifest pass the
    size and structure checks; loading it then fails with a CheckpointError naming the
    directory and pointing at `verify --full`, not with PyTorch's CheckpointException."""
    from megatron_dots import build_dots_model
    from megatron_dots.storage.errors import CheckpointError
    from megatron_dots.storage.manifest import MANIFEST
    from megatron_dots.storage.verify import verify_directory
    from reference import tiny_config

    cfg = tiny_config(num_layers=2)
    path = checkpointing.save_checkpoint([build_dots_model(cfg)], str(tmp_path), 1, cfg)
    (tmp_path / "iter_0000001" / MANIFEST).unlink()
    data_file = sorted((tmp_path / "iter_0000001").glob("__0_*.distcp"))[0]
    data = bytearray(data_file.read_bytes())
    start = data.index(b"\x80\x02", data.index(b"data.pkl"))  # the first record's pickle
    data[start + 2:start + 10] = b"\xff" * 8  # not a pickle opcode
    data_file.write_bytes(bytes(data))
    assert verify_directory(path, "torch_dist").intact  # sizes and structure are fine
    assert not verify_directory(path, "torch_dist", checksums=True).intact  # zip CRC-32s
    with pytest.raises(CheckpointError, match="damaged: reading it failed.*verify --ckpt"):
        checkpointing.load_checkpoint([build_dots_model(cfg)], path, load_rng=False)
