"""CPU backend (megatron_dots/compat/cpu_backend.py): scope, registry, RNG, RoPE, causal mask."""

import json
import textwrap

import pytest
import torch

from launch import describe, python_snippet
from megatron_dots.compat import cpu_backend
from megatron_dots.compat.cpu_backend import (
    PROXIED_MODULES,
    cpu_backend_active,
    enable_cpu_backend,
    patched_sites,
)
from megatron_dots.compat.distributed import default_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend tests (no CUDA)")


@pytest.fixture(scope="module", autouse=True)
def _backend():
    assert enable_cpu_backend() is True
    assert cpu_backend_active()


def test_idempotent():
    before = patched_sites()
    assert enable_cpu_backend() is True
    assert patched_sites() == before
    sites = [s for s, _ in before]
    assert len(sites) == len(set(sites))


def test_registry_printable_and_in_docstring():
    doc = cpu_backend.__doc__
    print("\n".join(f"{site}: {what}" for site, what in patched_sites(include_skipped=True)))
    for site, what in patched_sites():
        assert what
        if site.startswith("megatron/core/"):
            path = site[len("megatron/core/"):].split(":")[0].split(" ")[0]
            assert path in doc, f"{path} missing from cpu_backend docstring"
            if ":" in site and "module global" not in site:
                func = site.split(":", 1)[1].split(" ")[0]
                assert func in doc, f"{func} missing from cpu_backend docstring"
        elif site.startswith("torch.Tensor."):  # the one torch-level patch
            assert site.split()[0] in doc
        else:  # jit_fuser entries are dotted qualified names
            assert site.startswith("megatron.core.") and "jit_fuser" in what
    for name, _ in PROXIED_MODULES:
        assert name.replace(".", "/") + ".py" in doc


def test_record_stream_is_a_no_op_for_cpu_tensors():
    """The combined 1F1B (--dots-a2a-overlap) records tensors on its streams; torch has no CPU
    kernel for that, so without the backend the schedule fails on its first node."""
    proc = python_snippet(
        "import torch\n"
        "from megatron.core.pipeline_parallel import utils\n"
        "try:\n"
        "    torch.zeros(2).record_stream(torch.Stream('cpu'))\n"
        "    print('RESULT ok')\n"
        "except RuntimeError:\n"
        "    print('RESULT RuntimeError')\n"
        "import megatron_dots\n"
        "torch.zeros(2).record_stream(utils.torch.cuda.current_stream())\n"
        "print('RESULT ok')\n")
    assert proc.returncode == 0, describe(proc)
    assert [line for line in proc.stdout.splitlines() if line.startswith("RESULT")] == [
        "RESULT RuntimeError", "RESULT ok"]


def test_proxy_is_scoped_to_megatron_modules():
    from megatron.core.tensor_parallel import layers

    assert isinstance(layers.torch, cpu_backend._TorchProxy)
    assert layers.torch.cuda.current_device() == torch.device("cpu")
    assert layers.torch.zeros(2, device="cuda").device.type == "cpu"
    assert layers.torch.Tensor is torch.Tensor and layers.torch.nn is torch.nn
    # the real torch.cuda is untouched
    assert torch.cuda.current_device is not layers.torch.cuda.current_device
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_no_effect_when_cuda_available():
    """On a CUDA machine enable_cpu_backend() is a no-op (simulated in a fresh interpreter)."""
    code = textwrap.dedent(
        """
        import json, torch
        torch.cuda.is_available = lambda: True   # pretend to be a GPU machine (an H100:
        torch.cuda.get_device_name = lambda *a: "NVIDIA H100"  # megatron-core 0.20 asks at
        torch.cuda.get_device_capability = lambda *a: (9, 0)    # import time)
        from megatron_dots.compat import cpu_backend
        r = cpu_backend.enable_cpu_backend()
        from megatron.core.tensor_parallel import layers, random
        print("RESULT" + json.dumps({
            "ret": r, "active": cpu_backend.cpu_backend_active(),
            "sites": len(cpu_backend.patched_sites()),
            "layers_torch_is_torch": layers.torch is torch,
            "rng_fn_upstream": random._get_cuda_rng_state.__module__ == random.__name__,
        }))
        """
    )
    proc = python_snippet(code)
    assert proc.returncode == 0, describe(proc)
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    assert res == {
        "ret": False,
        "active": False,
        "sites": 0,
        "layers_torch_is_torch": True,
        "rng_fn_upstream": True,
    }


def test_without_backend_megatron_needs_cuda():
    """Sanity: the sites really are broken on CPU without the backend."""
    code = textwrap.dedent(
        """
        from megatron.core.transformer.utils import get_default_causal_mask
        try:
            get_default_causal_mask(4)
            print("RESULT ok")
        except (AssertionError, RuntimeError) as exc:
            print("RESULT failed:", exc)
        """
    )
    proc = python_snippet(code)
    assert proc.returncode == 0, describe(proc)
    assert "RESULT failed" in proc.stdout and "CUDA" in proc.stdout


def test_rng_tracker_on_cpu():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    assert set(tracker.get_states()) >= {"model-parallel-rng", "expert-parallel-rng"}

    state = torch.get_rng_state()
    a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    c = torch.rand(4)
    torch.set_rng_state(state)
    a2, c2 = torch.rand(4), torch.rand(4)
    assert torch.equal(a, a2) and torch.equal(c, c2)  # default stream restored after fork
    with tracker.fork():
        b2 = torch.rand(4)
    assert not torch.equal(b, b2)  # tracker state advanced
    assert not torch.equal(b, a)

    # the tensor-parallel stream depends on the TP rank, the default one does not
    model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        b_tp1 = torch.rand(4)
    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        b_tp0 = torch.rand(4)
    assert not torch.equal(b_tp0, b_tp1)


def test_default_causal_mask_and_rope():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(8)
    assert emb.device.type == "cpu" and emb.shape == (8, 1, 1, 16)


def test_default_device():
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("bf16,distributed,cls", [
    pytest.param(True, False, "Float16OptimizerWithFloat16Params", id="bf16"),
    pytest.param(False, True, "DistributedOptimizer", id="fp32-distributed"),
    pytest.param(True, True, "DistributedOptimizer", id="bf16-distributed"),
])
def test_mixed_precision_and_distributed_optimizers_take_cpu_parameters(
        seeded, monkeypatch, bf16, distributed, cls):
    """optimizer.py / distrib_optimizer.py sort parameters by 'torch.cuda.*Tensor' type names
    and reject CPU ones; during their constructors the backend names CPU tensors by their CUDA
    type, so they sort them the same way (fp32 main copies for the 16-bit ones)."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    from tiny_optimizer import one_step, tiny_chunks_and_optimizer

    klass = getattr(distrib_optimizer if distributed else optimizer, cls)
    chunks, built, _ = tiny_chunks_and_optimizer(bf16=bf16, distributed=distributed)
    inner = built.chained_optimizers[0]
    assert type(inner).__name__ == cls
    main = [p for group in inner.optimizer.param_groups for p in group["params"]]
    assert main and all(p.dtype == torch.float32 for p in main)  # fp32 main weights
    assert {p.dtype for p in chunks[0].parameters()} == {torch.bfloat16 if bf16 else torch.float32}
    result = one_step(chunks, built)
    assert result.update_successful and result.grad_norm > 0
    with monkeypatch.context() as patch:
        patch.setattr(klass, "__init__", klass.__init__.__wrapped_original__)
        with pytest.raises(TypeError, match="Wrapped parameters must be one of torch.cuda"):
            tiny_chunks_and_optimizer(bf16=bf16, distributed=distributed)


def test_distributed_optimizer_gathers_its_state_for_a_checkpoint_on_cpu(seeded, monkeypatch):
    """distrib_optimizer.py:get_parameter_state_dp_zero (the fully reshardable checkpoint)
    moves each shard to the GPU with .cuda() before the all-gather."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from tiny_optimizer import one_step, tiny_chunks_and_optimizer

    chunks, built, _ = tiny_chunks_and_optimizer(distributed=True)
    one_step(chunks, built)
    inner = built.chained_optimizers[0]
    state = inner.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)
    (world,) = state[0].values()  # one (param dtype, grad dtype) per buffer
    assert world["exp_avg"].abs().sum() > 0 and world["param"].numel() == world["numel_unpadded"]
    monkeypatch.setattr(DistributedOptimizer, "get_parameter_state_dp_zero",
                        DistributedOptimizer.get_parameter_state_dp_zero.__wrapped_original__)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        inner.get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)


def test_fp16_loss_scale_state_reloads_on_cpu(monkeypatch):
    """grad_scaler.py:DynamicGradScaler.load_state_dict moves the scale with .cuda()."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    def scaler():
        return DynamicGradScaler(initial_scale=2.0 ** 16, min_scale=1.0, growth_factor=2.0,
                                 backoff_factor=0.5, growth_interval=1000, hysteresis=2)

    saved = scaler()
    saved.update(found_inf=True)
    saved.update(found_inf=True)  # hysteresis 2: the second overflow halves the scale
    state = saved.state_dict()
    restored = scaler()
    restored.load_state_dict(state)
    assert restored.scale.item() == 2.0 ** 15 and restored.state_dict() == state
    monkeypatch.setattr(DynamicGradScaler, "load_state_dict",
                        DynamicGradScaler.load_state_dict.__wrapped_original__)
    with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):
        scaler().load_state_dict(state)
