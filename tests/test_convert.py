"""Checkpoint conversion: HF dots1 <-> Megatron-Core torch_dist, against transformers and
Megatron-Core's own dist_checkpointing (save and load under TP2 / EP2 / PP2 x VPP2)."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch import TESTS, describe, python_snippet, torchrun
from megatron_dots.config import DotsConfig, DotsConfigError
from megatron_dots.convert import dist_layout
from megatron_dots.convert.compare import compare
from megatron_dots.storage.errors import CheckpointError
from megatron_dots.convert.hf_reader import HFCheckpoint
from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_dots.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_dots.storage.checkpoint_format import TRACKER
from reference import make_hf_model, tiny_config


def _worker_module():
    spec = importlib.util.spec_from_file_location(
        "ckpt_worker", os.path.join(TESTS, "parallel", "ckpt_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_hf_dir(directory):
    """Every tensor of an HF directory, read with the safetensors library."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def assert_bit_identical(expected, actual):
    assert set(expected) == set(actual), set(expected) ^ set(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny dots1 model saved by transformers in several shards, with a non-zero
    expert bias and a tokenizer file."""
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=5, bias_scale=0.05)
    directory = str(tmp_path_factory.mktemp("hf") / "model")
    model.save_pretrained(directory, max_shard_size="200KB")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "marker": "kept"}, f)
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    return directory


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mcore") / "ckpt")
    convert_hf_to_mcore(hf_dir, out, tp=2, pp=2, ep=2, progress=False)
    return out


def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, converted, tmp_path):
    out = str(tmp_path / "hf")
    convert_mcore_to_hf(converted, out, max_shard_size="300KB", progress=False)
    original, exported = read_hf_dir(hf_dir), read_hf_dir(out)
    assert_bit_identical(original, exported)
    biases = [k for k in exported if k.endswith("e_score_correction_bias")]
    assert biases and all(exported[k].abs().max() > 0 for k in biases)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(exported)
    assert len(set(index["weight_map"].values())) > 1
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["marker"] == "kept"
    assert DotsConfig.from_hf_config(out) == DotsConfig.from_hf_config(hf_dir)

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


def test_bf16_export_keeps_bias_fp32(converted, tmp_path):
    out = str(tmp_path / "hf")
    convert_mcore_to_hf(converted, out, dtype="bf16", progress=False)
    tensors = read_hf_dir(out)
    for key, tensor in tensors.items():
        want = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
        assert tensor.dtype == want, key
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_converted_model_logits_match_transformers(hf_dir, converted):
    result = compare(converted, hf_dir, batch=2, seq_length=16)
    assert result.max_abs_diff <= 1e-4, result
    assert result.top1_agreement == 1.0


def test_compare_command_fails_on_a_different_model(converted, tmp_path):
    from megatron_dots.cli import main

    other = str(tmp_path / "other")
    make_hf_model(tiny_config(), seed=99, bias_scale=0.05).save_pretrained(other)
    assert main(["compare", "--ckpt", converted, "--hf", other, "--seq-length", "8"]) == 1


def _hf_loss(hf_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    losses = []
    with torch.no_grad():
        for micro in batch:
            logits = model(micro[:, :-1]).logits
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), micro[:, 1:].reshape(-1)).item())
    return sum(losses) / len(losses)


LAYOUTS = {
    "tp2-sp": (2, ["--tp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "pp2-vpp2": (2, ["--pp", "2", "--vpp", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_load_under_layout_then_saved_checkpoint_exports_identically(
        layout, hf_dir, converted, tmp_path):
    nproc, flags = LAYOUTS[layout]
    saved, out = str(tmp_path / "saved"), str(tmp_path / "loss.json")
    proc = torchrun("parallel/ckpt_worker.py", nproc, *flags, "--load", converted,
                    "--save", saved, "--out", out, timeout=300)
    assert proc.returncode == 0, describe(proc)
    worker = _worker_module()
    expected = _hf_loss(hf_dir, worker.fixed_batch(tiny_config().vocab_size))
    with open(out) as f:
        assert abs(json.load(f)["loss"] - expected) <= 1e-5
    with open(os.path.join(saved, TRACKER)) as f:
        assert f.read().strip() == "7"
    exported = str(tmp_path / "hf")
    convert_mcore_to_hf(saved, exported, progress=False)
    assert_bit_identical(read_hf_dir(hf_dir), read_hf_dir(exported))


def test_layout_description_matches_megatron_sharded_state_dict(seeded):
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    from megatron_dots.model import build_dots_model

    cfg = tiny_config()
    sharded = build_dots_model(cfg).sharded_state_dict()
    apply_factories(sharded)
    tensors, objects = {}, set()
    for value in sharded.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ShardedTensor):
                tensors[item.key] = tuple(item.global_shape)
            elif isinstance(item, ShardedObject):
                objects.add(item.unique_key)
    ours = dist_layout.stored_tensors(cfg, cfg.padded_vocab_size())
    assert {t.key: t.shape for t in ours} == tensors
    assert set(dist_layout.extra_state_keys(cfg)) == objects


# ------------------------------------------------------------------ bad input


def _copy(hf_dir, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(hf_dir, target)
    return target


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_missing_shard_names_index_and_shard(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path)
    os.remove(os.path.join(bad, "model-00002-of-00008.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard "
                       r"'model-00002-of-00008\.safetensors'"):
        convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)


def test_config_that_is_not_dots1(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path)
    _edit_config(bad, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type"):
        convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)


def test_shape_mismatch_names_file_and_tensor(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path)
    _edit_config(bad, moe_intermediate_size=16)
    with pytest.raises(CheckpointError, match=r"safetensors: tensor "
                       r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape"):
        convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)


def test_hf_with_more_experts_than_its_config(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path)
    _edit_config(bad, n_routed_experts=4)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*experts\.4\."):
        convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)


def test_checkpoint_saved_with_other_expert_count(converted, hf_dir, tmp_path):
    bigger = str(tmp_path / "config16.json")
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["n_routed_experts"] = 16
    with open(bigger, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"\.metadata: tensor .*router\.weight' has shape "
                       r"\[8, 64\], the config implies \[16, 64\]"):
        convert_mcore_to_hf(converted, str(tmp_path / "out"), config_path=bigger,
                            progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_bad_parallel_layout_names_the_flag(hf_dir, tmp_path):
    with pytest.raises(DotsConfigError, match=r"--ep 3 does not divide num_moe_experts 8"):
        convert_hf_to_mcore(hf_dir, str(tmp_path / "out"), ep=3, progress=False)
    with pytest.raises(DotsConfigError, match=r"--pp 3 does not divide num_layers 4"):
        convert_hf_to_mcore(hf_dir, str(tmp_path / "out"), pp=3, progress=False)


def test_unfinished_checkpoint_is_refused(converted, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(converted, broken)
    os.remove(os.path.join(broken, "release", ".metadata"))
    with pytest.raises(CheckpointError, match=r"release/\.metadata: missing"):
        convert_mcore_to_hf(broken, str(tmp_path / "out"), progress=False)


def test_failure_while_writing_keeps_the_previous_checkpoint(hf_dir, converted, tmp_path,
                                                              monkeypatch):
    out = str(tmp_path / "ckpt")
    shutil.copytree(converted, out)
    calls = {"n": 0}
    real_get = HFCheckpoint.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(HFCheckpoint, "get", failing_get)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_mcore(hf_dir, out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted(os.listdir(converted))  # no partial left
    exported = str(tmp_path / "hf")
    convert_mcore_to_hf(out, exported, progress=False)
    assert_bit_identical(read_hf_dir(hf_dir), read_hf_dir(exported))


def test_killed_conversion_leaves_nothing_that_looks_complete(hf_dir, tmp_path):
    out = str(tmp_path / "ckpt")
    code = f"""
import os, signal
from megatron_dots.convert import hf_reader
from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore
real, calls = hf_reader.HFCheckpoint.get, [0]
def get(self, name):
    calls[0] += 1
    if calls[0] == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name)
hf_reader.HFCheckpoint.get = get
if __name__ == "__main__":
    convert_hf_to_mcore({hf_dir!r}, {out!r}, progress=False)
"""
    script = tmp_path / "kill.py"
    script.write_text(code)
    proc = python_snippet(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    assert proc.returncode == -9, describe(proc)
    left = os.listdir(out)
    assert TRACKER not in left and "release" not in left, left
    assert all(name.startswith(".release.partial-") for name in left), left
    convert_hf_to_mcore(hf_dir, out, progress=False)  # a new run succeeds beside the debris
    assert open(os.path.join(out, TRACKER)).read() == "release"


def test_fused_expert_layout_on_disk_is_read_per_expert(hf_dir, tmp_path):
    # transformers-5 in-memory names (gate_up_proj [E, 2I, H], down_proj [E, H, I]) on disk.
    from safetensors.torch import save_file

    from megatron_dots.convert.hf_mapping import fuse_hf_experts

    fused_dir = str(tmp_path / "fused")
    os.makedirs(fused_dir)
    shutil.copy(os.path.join(hf_dir, "config.json"), fused_dir)
    original = read_hf_dir(hf_dir)
    fused = fuse_hf_experts(original)
    assert any(k.endswith("gate_up_proj") for k in fused)
    save_file({k: v.contiguous() for k, v in fused.items()},
              os.path.join(fused_dir, "model.safetensors"))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    convert_hf_to_mcore(fused_dir, ckpt, progress=False)
    convert_mcore_to_hf(ckpt, out, progress=False)
    assert_bit_identical(original, read_hf_dir(out))


def test_fused_experts_with_another_expert_count_are_refused(hf_dir, tmp_path):
    from safetensors.torch import save_file

    from megatron_dots.convert.hf_mapping import fuse_hf_experts

    fused_dir = str(tmp_path / "fused")
    os.makedirs(fused_dir)
    shutil.copy(os.path.join(hf_dir, "config.json"), fused_dir)
    _edit_config(fused_dir, n_routed_experts=4)
    save_file({k: v.contiguous() for k, v in fuse_hf_experts(read_hf_dir(hf_dir)).items()},
              os.path.join(fused_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                       r"'model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj' holds 8 experts"):
        convert_hf_to_mcore(fused_dir, str(tmp_path / "ckpt"), progress=False)
