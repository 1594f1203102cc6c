"""Checkpoint integrity in training: the manifest of a two-rank save (each rank checksums its
own files), `verify`, and `pretrain --load` on a damaged latest checkpoint (falls back to the
newest intact one and reproduces the uninterrupted run's losses), on an explicitly named
damaged one (fails naming the file), with changed bytes (found with
--dots-verify-load-checksums) and with nothing intact left."""

import json
import os
import shutil
import zlib

import pytest

from pretrain_runs import CONSTANT_LR, flags, losses, run

from megatron_dots.cli import main as cli_main
from megatron_dots.storage.manifest import MANIFEST


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    """8 iterations on 2 data-parallel ranks, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("integrity")
    run(flags(data, out, train_iters=8, save=out / "ckpt", save_interval=4, eval_iters=0,
              dots_loss_csv=out / "losses.csv", **CONSTANT_LR), nproc=2)
    return out


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_manifest_records_every_rank_file(two_rank_run, capsys):
    directory = two_rank_run / "ckpt" / "iter_0000008"
    manifest = json.load(open(directory / MANIFEST))
    assert manifest["checksum"] == "crc32"
    files = sorted(n for n in os.listdir(directory) if n != MANIFEST)
    assert sorted(manifest["files"]) == files
    assert any(n.startswith("__1_") for n in files) and any(n.startswith("__0_") for n in files)
    for name, record in manifest["files"].items():
        data = open(directory / name, "rb").read()
        assert record == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert cli_main(["verify", "--ckpt", str(two_rank_run / "ckpt"), "--full"]) == 0
    out = capsys.readouterr().out
    assert "iter_0000008 (latest): intact" in out and "iter_0000004: intact" in out


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(two_rank_run, data,
                                                                       tmp_path, capsys):
    ckpt = _copy(two_rank_run, tmp_path)
    damaged = ckpt / "iter_0000008" / "__1_0.distcp"
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    assert cli_main(["verify", "--ckpt", str(ckpt)]) == 1
    assert f"DAMAGED: {damaged}" in capsys.readouterr().out
    proc = run(flags(data, tmp_path, train_iters=8, load=ckpt, save=ckpt, save_interval=4,
                     eval_iters=0, dots_loss_csv=tmp_path / "losses.csv", **CONSTANT_LR),
               nproc=2)
    assert f"the latest checkpoint {ckpt / 'iter_0000008'} is damaged: {damaged}" in proc.stdout
    assert f"resuming from {ckpt / 'iter_0000004'}, the newest intact checkpoint" in proc.stdout
    first, resumed = losses(two_rank_run / "losses.csv"), losses(tmp_path / "losses.csv")
    assert sorted(resumed) == [5, 6, 7, 8]
    for iteration in resumed:
        assert resumed[iteration] == pytest.approx(first[iteration], rel=1e-6, abs=0), iteration
    # The run saved iteration 8 again: the damaged directory was replaced by an intact one.
    assert cli_main(["verify", "--ckpt", str(ckpt / "iter_0000008"), "--full"]) == 0


def test_explicitly_named_damaged_checkpoint_fails_naming_the_file(two_rank_run, data,
                                                                   tmp_path):
    ckpt = _copy(two_rank_run, tmp_path)
    os.remove(ckpt / "iter_0000008" / ".metadata")  # (common.pt: not saved by 0.19+)
    proc = run(flags(data, tmp_path, train_iters=9, load=ckpt / "iter_0000008", eval_iters=0,
                     **CONSTANT_LR), returncode=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {ckpt / 'iter_0000008' / '.metadata'}: --load names a damaged "
                      f"checkpoint: missing (listed in {MANIFEST})"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_changed_bytes_are_found_with_checksums_and_nothing_intact_stops_the_run(
        two_rank_run, data, tmp_path):
    ckpt = _copy(two_rank_run, tmp_path)
    flipped = ckpt / "iter_0000008" / "__0_0.distcp"
    data_bytes = bytearray(open(flipped, "rb").read())
    data_bytes[len(data_bytes) // 2] ^= 0x40  # inside a tensor: the size stays right
    open(flipped, "wb").write(bytes(data_bytes))
    proc = run(flags(data, tmp_path, train_iters=5, load=ckpt, eval_iters=0,
                     dots_verify_load_checksums=True, **CONSTANT_LR), nproc=2)
    assert f"{flipped}: crc32" in proc.stdout and "(its bytes changed)" in proc.stdout
    assert "resumed from" in proc.stdout and "iter_0000004 at iteration 4" in proc.stdout
    # Without an intact checkpoint left, the run stops and names the damage.
    os.remove(ckpt / "iter_0000004" / ".metadata")
    proc = run(flags(data, tmp_path, train_iters=5, load=ckpt, eval_iters=0,
                     dots_verify_load_checksums=True, **CONSTANT_LR), returncode=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(flipped) in errors[0], proc.stderr[-2000:]
    assert "no older intact checkpoint" in errors[0]


def test_verify_refuses_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["verify", "--ckpt", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'}: neither")
    assert cli_main(["verify", "--hf", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
