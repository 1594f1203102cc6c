"""Explicit CPU backend for Megatron-Core (gloo, no CUDA).

Megatron-Core hard-codes CUDA in many places (``torch.cuda.current_device()`` as a tensor
device, ``device="cuda"`` literals, CUDA RNG state, CUDA streams/events, ``.cuda()`` calls).
:func:`enable_cpu_backend` makes the training path of GPT/MoE models run on CPU with
``torch.distributed`` gloo: single process and torchrun, TP (+SP), EP (alltoall token
dispatcher), PP, PP with virtual pipeline (interleaved 1F1B), Megatron DDP with overlapped
gradient reduce(-scatter) and parameter all-gather, ``finalize_model_grads`` (incl. the MoE
router expert-bias update), and Megatron-Core's optimizers as real runs use them: bf16 / fp16
parameters in ``Float16Module`` with the mixed-precision optimizer (fp32 main weights, dynamic
loss scaling for fp16), the distributed optimizer (fp32 main weights and Adam state sharded
over data-parallel ranks), gradient clipping and its fully reshardable checkpoint state.

Collectives: gloo in torch >= 2.x implements every collective this path calls, for fp32, bf16
and fp16 tensors, including ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (the
distributed optimizer's bucket reduce-scatter and parameter all-gather) inside
``_coalescing_manager`` (verified on torch 2.13), so nothing is emulated: the same NCCL-path
calls run on gloo. Streams and events are no-ops on CPU, so "overlapped" communication runs
at the point it is issued (asynchronous handles are waited on where upstream waits): the
order of operations and the numbers are those of a GPU run, the overlap itself is not.

Scope and safety
----------------
* Active only when ``torch.cuda.is_available()`` is False. On a CUDA machine
  :func:`enable_cpu_backend` does nothing and returns False: no effect at all on GPU runs.
* Idempotent; patches are applied once per process.
* ``torch.cuda`` itself is NOT monkeypatched. Instead, in each megatron module listed below,
  the module-global name ``torch`` is replaced by a :class:`_TorchProxy`. The proxy forwards
  every attribute to the real ``torch`` except:

  - ``proxy.cuda`` -> :class:`_CpuCudaNamespace`: ``current_device()`` -> ``torch.device("cpu")``,
    ``get_rng_state/set_rng_state/manual_seed(_all)`` -> the CPU default generator
    (``torch.get_rng_state`` ...), ``Stream/Event/current_stream/default_stream/stream()/
    synchronize/empty_cache/nvtx.*`` -> no-ops, ``is_available()`` -> False; any other
    attribute is forwarded to the real ``torch.cuda``.
  - tensor factories (``tensor, as_tensor, zeros, ones, empty, full, arange, rand, randn,
    randint, randperm, eye, linspace, *_like, empty_strided``) map a CUDA ``device``
    (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)``, an int index) to CPU and drop
    ``pin_memory=True``.

  Code outside these modules (your code, torch, other libraries) sees the real ``torch``.
* Seeding note: on this backend "the CUDA default generator" *is* the CPU default generator,
  so ``model_parallel_cuda_manual_seed(seed)`` reseeds the CPU generator with ``seed`` (the
  same thing Megatron's training loop does with ``torch.manual_seed(seed)`` right before it),
  and ``get_cuda_rng_tracker().fork()`` swaps CPU generator states.
* Pipeline parallelism: use ``ModelParallelConfig(batch_p2p_comm=False)`` on CPU (the default is
  True). With gloo and PP=2, ``batch_p2p_comm=True`` (``torch.distributed.batch_isend_irecv``)
  silently corrupts received tensors: with the interleaved schedule (VPP=2) the losses come
  out wrong by ~1e-2 with no error (plain PP=2 1F1B happened to be correct in our tests). Likely
  cause: with PP=2 the previous and next stage are the same peer, one batch holds sends and
  receives in both directions, and gloo pairs same-peer messages in posting order, so the
  activation and the gradient (same shape) land in each other's buffers. The
  backend therefore raises at ``P2PCommunicator`` construction when ``batch_p2p_comm=True`` and
  the pipeline group has more than one rank.
* Not covered / untested: context parallelism
  (``models/common/embeddings/rope_utils.py:get_pos_emb_on_this_cp_rank`` pins memory and calls
  ``.cuda()``); CUDA graphs; ``utils.py:check_param_hashes_across_dp_replicas`` and the
  optimizer CPU-offload reload (``.cuda()``); the distributed optimizer's legacy and
  ``dp_reshardable`` checkpoint formats (``save_parameter_state``); the precision-aware
  optimizer; TE/apex kernels and fused
  paths that need CUDA (``moe_permute_fusion``, ``gradient_accumulation_fusion``);
  ``enable_autocast`` (``schedules.py`` uses ``torch.autocast("cuda")``).

* megatron-core 0.19 imports ``triton`` unconditionally
  (``pipeline_parallel/schedules.py`` -> ``transformer/moe/paged_stash.py`` ->
  ``transformer/moe/ops/paged_stash.py``), so on a CPU machine the ``triton`` package must be
  importable (CPU torch wheels do not bring it); this backend cannot work around a failing
  ``import megatron.core``.

Patched upstream sites (paths relative to ``megatron/core``; written against 0.16.1, all sites
also present in 0.19.2, which CI tests; a site that does not exist in the installed
release is skipped and reported by ``patched_sites(include_skipped=True)``):

``torch`` -> :class:`_TorchProxy` in these modules (the CUDA uses each one has on 0.16.1):

* ``parallel_state.py``: ``update_pg_timeout`` (``torch.cuda.synchronize``),
  ``initialize_model_parallel`` SHARP barriers (``device_ids=[torch.cuda.current_device()]``).
* ``utils.py``: ``GlobalMemoryBuffer.get_tensor`` (``device=torch.cuda.current_device()``; used
  by ``DotProductAttention.forward`` and the SP all-gather), ``nvtx_range_push/pop``
  (``torch.cuda.nvtx``), ``StragglerDetector`` (``torch.cuda.Event``), THD helpers
  (``device="cuda"``).
* ``tensor_parallel/random.py``: ``CudaRNGStatesTracker.add`` (``torch.cuda.get_rng_state`` /
  ``manual_seed``), ``model_parallel_cuda_manual_seed`` (``torch.cuda.manual_seed``),
  ``_get_cuda_rng_state`` (``torch.cuda.random.get_rng_state``).
* ``tensor_parallel/layers.py``: ``VocabParallelEmbedding.__init__``,
  ``ColumnParallelLinear.__init__``, ``RowParallelLinear.__init__`` (weights on
  ``current_device`` when ``use_cpu_initialization=False``),
  ``LinearWithGradAccumulationAndAsyncCommunication.forward/backward`` (SP all-gather buffer
  and ``main_grad`` buffers on ``current_device``).
* ``tensor_parallel/mappings.py``: ``_gather_along_last_dim``, ``_gather_along_first_dim``,
  ``_reduce_scatter_along_first_dim``, ``_AllToAll.forward``: output buffers on
  ``torch.cuda.current_device()``.
* ``tensor_parallel/utils.py``: ``split_tensor_into_1d_equal_chunks``,
  ``gather_split_1d_tensor``: buffers on ``current_device``.
* ``tensor_parallel/data.py``: ``_build_key_size_numel_dictionaries`` (``device='cuda'``),
  ``broadcast_data`` (flat buffer on ``current_device``).
* ``transformer/attention.py``: ``Attention._allocate_memory`` (inference KV cache).
* ``transformer/dot_product_attention.py``: ``DotProductAttention.__init__`` (``softmax_offset``
  for ``softmax_type`` off-by-one / learnable).
* ``transformer/module.py``: ``GraphableMegatronModule.get_layer_static_inputs``.
* ``transformer/transformer_layer.py``: ``TransformerLayer.get_layer_static_inputs`` and the
  zero attention mask helper (``current_device``).
* ``transformer/mlp.py``: ``MLP.sharded_state_dict`` merge fn (``torch.cuda.OutOfMemoryError``,
  ``empty_cache``).
* ``transformer/utils.py``: ``get_default_causal_mask`` / ``get_sliding_window_causal_mask``
  (``torch.ones(..., device="cuda")``; the default causal mask used when ``attention_mask`` is
  None).
* ``transformer/moe/router.py``: ``Router.gating`` (moves weight/bias to
  ``torch.cuda.current_device()``), ``TopKRouter.__init__`` (``local_tokens_per_expert``,
  ``expert_bias``, ``global_tokens_per_expert``, ``ga_steps`` buffers on ``current_device``).
* ``transformer/moe/token_dispatcher.py``: ``MoEAlltoAllTokenDispatcher.__init__``
  (``torch.cuda.Stream()`` for the class attribute ``cuda_dtoh_stream``),
  ``_maybe_dtoh_and_synchronize`` (``current_stream/stream()/record_event/synchronize``).
* ``transformer/moe/moe_utils.py``: ``save_to_aux_losses_tracker`` (``device="cuda"``),
  ``maybe_move_tensor_to_cpu`` (``current_stream``).
* ``transformer/moe/experts.py``: ``GroupedMLP.__init__`` (weights on ``current_device``).
* ``transformer/moe/shared_experts.py``: ``SharedExpertMLP`` overlap stream
  (``torch.cuda.Stream``, ``stream()``, ``current_stream().wait_stream``).
* ``models/gpt/gpt_model.py``: ``GPTModel._preprocess`` (inference ``sequence_len_offset``).
* ``models/common/embeddings/rotary_pos_embedding.py``: ``RotaryEmbedding.__init__`` (inv_freq
  device when ``use_cpu_initialization=False``), ``RotaryEmbedding.get_emb``
  (``inv_freq.to(torch.cuda.current_device())``), ``MultimodalRotaryEmbedding.__init__``.
* ``models/common/embeddings/yarn_rotary_pos_embedding.py``: ``YarnRotaryEmbedding`` (same).
* ``pipeline_parallel/p2p_communication.py``: ``P2PCommunicator._communicate`` /
  ``_communicate_shapes`` (receive buffers on ``current_device``, ``torch.cuda.synchronize``).
* ``pipeline_parallel/schedules.py``: ``forward_backward_no_pipelining`` and the two pipelined
  schedules (``total_num_tokens = torch.zeros([], device="cuda")``).
* The combined 1F1B schedule (``overlap_moe_expert_parallel_comm``, ``--dots-a2a-overlap``):
  ``pipeline_parallel/utils.py`` (``ScheduleNode`` stream/event contexts, ``set_streams``
  creating ``torch.cuda.Stream``), ``pipeline_parallel/combined_1f1b.py`` (``current_stream``),
  ``models/common/model_chunk_schedule_plan.py`` (``torch.cuda.Event``, nvtx),
  ``models/gpt/fine_grained_callables.py`` and on 0.19 ``models/common/fine_grained_callables.py``
  (``current_stream``, nvtx) and ``models/common/utils.py`` (``TransformerLayerNode``,
  ``torch.cuda.stream``). With gloo the all-to-alls are blocking: the schedule runs its
  nodes in order, which is what the correctness tests need (no overlap is measured on CPU).
* ``dist_checkpointing/strategies/filesystem_async.py``: ``FileSystemWriterAsync.preload_tensors``
  (``torch.cuda.synchronize``) on every ``dist_checkpointing.save``.
* ``dist_checkpointing/strategies/state_dict_saver.py``: ``save_state_dict_async_finalize``
  (failure flag on ``current_device``), ``verify_global_md_reuse`` (``device='cuda'``).
* ``distributed/distributed_data_parallel.py``: ``DistributedDataParallel.__init__``
  (``torch.cuda.Stream`` for overlapped grad reduce), ``free/allocate`` buffer helpers
  (``synchronize``/``empty_cache``).
* ``distributed/param_and_grad_buffer.py``: ``_ParamAndGradBuffer.__init__`` (param / grad
  buffers on ``current_device``: the DDP grad buffers), ``_ParamAndGradBucketGroup``
  communication stream context and ``default_stream().wait_stream``.
* ``optimizer/optimizer.py``: ``MixedPrecisionOptimizer.__init__`` and
  ``FP32Optimizer.__init__`` (``torch.tensor(..., device='cuda')``: ``found_inf``, ``_scale``,
  ``_dummy_overflow_buf``), ``ChainedOptimizer.get_loss_scale``.
* ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer.load_state_dict`` (dummy state
  shards on ``current_device``), ``get_parameter_state_dp_zero`` receive buffers.
* ``optimizer/clip_grads.py``: ``get_grad_norm_fp32``, ``count_zeros_fp32`` (``device='cuda'``).
* ``optimizer/grad_scaler.py``: ``ConstantGradScaler`` / ``DynamicGradScaler`` scale tensors.
* ``rerun_state_machine.py``: ``RerunStateMachine._reduce_any`` (``device='cuda'``),
  ``_save_state/_restore_state`` (``torch.cuda.get/set_rng_state``), ``current_device`` uses.

Function / method replacements:

* ``tensor_parallel/random.py:_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> CPU generator
  state (upstream uses ``torch.cuda.default_generators`` and ``torch.cuda._lazy_call``; on a
  CPU-only build ``_lazy_call`` queues the callback forever, so states would silently never be
  restored).
* ``tensor_parallel/mappings.py:_gather_along_first_dim`` -> with ``output_split_sizes`` of
  unequal sizes (the alltoall dispatcher under expert-TP > 1), pads every piece to the largest,
  gathers, and trims: gloo's ``all_gather`` only takes equal-size tensors.
* ``optimizer/clip_grads.py:clip_grad_by_total_norm_fp32`` (also rebound in
  ``optimizer/optimizer.py``) -> same computation, but accepts ``torch.FloatTensor`` grads
  (upstream asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``).
* ``models/common/language_module/language_module.py:LanguageModule.setup_embeddings_and_output_layer``
  -> runs with ``Tensor.cuda`` as identity for the duration of the call (upstream calls
  ``weight.data.cuda()`` before the first/last-stage embedding all-reduce with tied embeddings
  and PP>1; on a CPU-only build ``Tensor.cuda`` can only raise).
* ``tensor_parallel/data.py:broadcast_data`` (rebound wherever imported) -> runs with
  ``Tensor.cuda`` as identity (upstream flattens ``data[key].cuda()``).
* ``optimizer/optimizer.py:Float16OptimizerWithFloat16Params.__init__`` and
  ``optimizer/distrib_optimizer.py:DistributedOptimizer.__init__`` -> run with ``Tensor.type()``
  naming CPU fp32 / bf16 / fp16 tensors by their CUDA type (``"torch.cuda.BFloat16Tensor"``):
  upstream sorts parameters by that string (an fp32 main copy for each 16-bit one, fp32 ones
  used as they are) and raises ``TypeError`` for any other, i.e. for every CPU parameter.
  ``Tensor.type(dtype)`` conversions are untouched; the swap lasts for the constructor call.
* ``optimizer/distrib_optimizer.py:DistributedOptimizer.get_parameter_state_dp_zero`` -> runs
  with ``Tensor.cuda`` as identity (the fully reshardable checkpoint format moves each state
  shard to the GPU before the all-gather that collects it).
* ``optimizer/grad_scaler.py:DynamicGradScaler.load_state_dict`` -> runs with ``Tensor.cuda``
  as identity (upstream moves the restored fp16 loss scale with ``.cuda(current_device)``).
* ``pipeline_parallel/p2p_communication.py:P2PCommunicator.__init__`` -> raises ``ValueError``
  when ``config.batch_p2p_comm`` is True and the pipeline group has >1 rank (see above).
* Every function decorated with ``megatron.core.jit.jit_fuser`` (``torch.compile``) in an
  imported ``megatron.core`` module, module-level or class attribute, is replaced by its eager
  original, and ``megatron.core.jit.disable_jit_fuser()`` is called so modules imported later
  get the no-op decorator. Reason: on CPU, inductor compiles each of them on first call
  (~30 s per process for the tiny test models, results identical). On 0.16.1 this covers
  ``activations.{fast_gelu,quick_gelu,squared_relu}``, ``fusions.fused_bias_dropout.*``,
  ``fusions.fused_bias_geglu.*``, ``fusions.fused_bias_gelu.*``, ``fusions.fused_bias_swiglu.*``,
  ``fusions.fused_cross_entropy.*``, ``fusions.fused_pad_routing_map.*``,
  ``fusions.fused_weighted_squared_relu.*``,
  ``transformer.attention.Attention._apply_output_gate``,
  ``transformer.moe.router.TopKRouter._apply_expert_bias``,
  ``transformer.moe.token_dispatcher.MoEFlexTokenDispatcher.dispatch_preprocess``,
  ``transformer.torch_norm.L2Norm._norm``, ``transformer.utils.{erf_gelu,gelu_impl}``; the
  exact list is in :func:`patched_sites`.

* ``torch.Tensor.record_stream`` -> returns without effect for CPU tensors, process-wide
  (CPU-only processes only). The combined 1F1B schedule (``--dots-a2a-overlap``:
  ``pipeline_parallel/utils.py:ScheduleNode``, ``models/gpt/fine_grained_callables.py``) records
  tensors on its streams; torch has no CPU kernel for that and CPU work is synchronous.

``Tensor.cuda`` identity: the swap is process-wide but only for the duration of the four wrapped
calls; on a CPU-only torch build ``Tensor.cuda`` can only raise, so nothing else changes.

The non-CPU-specific upstream defects (``te_general_gemm`` NameError, tensor split sizes to
``all_to_all_single``) are fixed in :mod:`megatron_dots.compat.runtime_patches`, which the CPU
path also needs: call ``apply_runtime_patches()`` too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
import types
from typing import Callable, List, Optional, Tuple

import torch

__all__ = [
    "enable_cpu_backend",
    "cpu_backend_active",
    "patched_sites",
    "PROXIED_MODULES",
]

_CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------
# CPU stand-in for torch.cuda
# ---------------------------------------------------------------------------------------------


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so every op is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``; also usable as a context manager."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_DEFAULT_STREAM = _NullStream()


class _Namespace(types.SimpleNamespace):
    pass


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def _null_context(*args, **kwargs):
    yield


class _CpuCudaNamespace:
    """What ``torch.cuda`` looks like to the proxied megatron modules on the CPU backend."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self, real_cuda):
        self._real = real_cuda
        self.nvtx = _Namespace(range_push=_noop, range_pop=_noop, mark=_noop, range=_null_context)
        self.random = _Namespace(
            get_rng_state=self.get_rng_state,
            set_rng_state=self.set_rng_state,
            manual_seed=self.manual_seed,
            manual_seed_all=self.manual_seed_all,
        )

    # devices -----------------------------------------------------------------------------
    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def set_device(device):
        return None

    @staticmethod
    def is_current_stream_capturing():
        return False

    # rng ---------------------------------------------------------------------------------
    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device=None):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)

    @staticmethod
    def initial_seed():
        return torch.initial_seed()

    # streams / sync / memory ---------------------------------------------------------------
    @staticmethod
    def current_stream(device=None):
        return _DEFAULT_STREAM

    @staticmethod
    def default_stream(device=None):
        return _DEFAULT_STREAM

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    synchronize = staticmethod(_noop)
    empty_cache = staticmethod(_noop)
    reset_peak_memory_stats = staticmethod(_noop)

    @staticmethod
    def memory_allocated(device=None):
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    def __getattr__(self, name):
        # Types (FloatTensor, OutOfMemoryError, CUDAGraph, ...) and anything not overridden
        # above come from the real torch.cuda; calling into CUDA there raises as usual.
        return getattr(self._real, name)

    def __repr__(self):
        return "<megatron_dots CPU stand-in for torch.cuda>"


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # torch treats a bare int device as a CUDA index
    return False


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    wrapper.__megatron_dots_cpu_factory__ = True
    return wrapper


_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "eye",
    "linspace",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "empty_strided",
)


class _TorchProxy(types.ModuleType):
    """``torch`` as seen by one proxied megatron module on the CPU backend."""

    def __init__(self, cuda_namespace: _CpuCudaNamespace):
        super().__init__("torch", torch.__doc__)
        self.cuda = cuda_namespace
        for name in _FACTORIES:
            if hasattr(torch, name):
                setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    def __repr__(self):
        return "<megatron_dots CPU proxy for module 'torch'>"


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------

# (module under megatron.core, what it needs the proxy for). Keep in sync with the docstring.
PROXIED_MODULES: Tuple[Tuple[str, str], ...] = (
    ("parallel_state", "torch.cuda.synchronize/current_device in pg-timeout and SHARP set-up"),
    ("utils", "GlobalMemoryBuffer.get_tensor buffers on current_device, nvtx, cuda events"),
    ("tensor_parallel.random", "rng tracker: torch.cuda rng state/manual_seed -> CPU generator"),
    ("tensor_parallel.layers", "weight / SP all-gather / main_grad buffers on current_device"),
    ("tensor_parallel.mappings", "gather/reduce-scatter/all-to-all buffers on current_device"),
    ("tensor_parallel.utils", "gather_split_1d_tensor buffers on current_device"),
    ("tensor_parallel.data", "broadcast_data size buffers device='cuda'"),
    ("transformer.attention", "inference KV-cache buffers on current_device"),
    ("transformer.dot_product_attention", "softmax-offset buffers on current_device"),
    ("transformer.module", "GraphableMegatronModule static inputs on current_device"),
    ("transformer.transformer_layer", "tensors moved to torch.cuda.current_device()"),
    ("transformer.mlp", "torch.cuda.empty_cache/OutOfMemoryError on sharded-state path"),
    ("transformer.utils", "get_default_causal_mask: torch.ones(..., device='cuda')"),
    ("transformer.moe.router", "TopKRouter buffers / Router.gating weight move on current_device"),
    ("transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher DtoH stream/event"),
    ("transformer.moe.moe_utils", "aux-loss tracker device='cuda', current_stream"),
    ("transformer.moe.experts", "GroupedMLP weights on current_device"),
    ("transformer.moe.shared_experts", "SharedExpertMLP overlap stream"),
    ("models.gpt.gpt_model", "GPTModel helper tensors on current_device"),
    ("models.common.embeddings.rotary_pos_embedding", "RoPE inv_freq on current_device"),
    ("models.common.embeddings.yarn_rotary_pos_embedding", "YaRN inv_freq on current_device"),
    ("pipeline_parallel.p2p_communication", "p2p receive buffers on current_device, synchronize"),
    ("pipeline_parallel.schedules", "total_num_tokens = torch.zeros(..., device='cuda')"),
    ("pipeline_parallel.utils", "combined 1F1B ScheduleNode: streams, events, nvtx"),
    ("pipeline_parallel.combined_1f1b", "combined 1F1B: comm stream set-up, current_stream"),
    ("models.common.model_chunk_schedule_plan", "combined 1F1B plan: torch.cuda.Event, nvtx"),
    ("models.gpt.fine_grained_callables", "combined 1F1B layer callables: current_stream, nvtx"),
    ("models.common.fine_grained_callables", "combined 1F1B callables (0.19): streams, nvtx"),
    ("models.common.utils", "combined 1F1B TransformerLayerNode (0.19): torch.cuda.stream"),
    ("distributed.distributed_data_parallel", "communication stream, synchronize/empty_cache"),
    ("distributed.param_and_grad_buffer", "DDP param/grad buffers on current_device, streams"),
    ("optimizer.optimizer", "found_inf/_scale/_dummy_overflow_buf device='cuda'"),
    ("optimizer.distrib_optimizer", "state-dict gather / dummy shards on current_device"),
    ("optimizer.clip_grads", "grad-norm / count-zeros buffers device='cuda'"),
    ("optimizer.grad_scaler", "loss-scale tensors device='cuda'"),
    ("rerun_state_machine", "device='cuda' reductions, torch.cuda rng state"),
    ("dist_checkpointing.strategies.filesystem_async", "preload_tensors: torch.cuda.synchronize"),
    ("dist_checkpointing.strategies.state_dict_saver", "failure flag / reuse check on current_device"),
)

_LOCK = threading.Lock()
_ACTIVE = False
_SITES: List[Tuple[str, str]] = []
_SKIPPED: List[Tuple[str, str]] = []
_CUDA_NS: Optional[_CpuCudaNamespace] = None


def cpu_backend_active() -> bool:
    """True once :func:`enable_cpu_backend` has patched this process."""
    return _ACTIVE


def patched_sites(include_skipped: bool = False) -> List[Tuple[str, str]]:
    """The registry: ``(upstream_site, description)`` for each applied patch.

    With ``include_skipped=True`` sites that were absent in the installed megatron-core are
    appended as ``(site, "SKIPPED: reason")``.
    """
    out = list(_SITES)
    if include_skipped:
        out += [(s, f"SKIPPED: {why}") for s, why in _SKIPPED]
    return out


def _import(name: str):
    try:
        return importlib.import_module(f"megatron.core.{name}")
    except Exception as exc:  # moved / removed in another release
        _SKIPPED.append((f"megatron/core/{name.replace('.', '/')}.py", f"import failed: {exc}"))
        return None


def _rebind_function(module, name: str, new: Callable, site: str, description: str) -> bool:
    """Replace ``module.name`` and every ``megatron.core.*`` module global bound to it."""
    old = getattr(module, name, None) if module is not None else None
    if old is None:
        _SKIPPED.append((site, "attribute not found"))
        return False
    new.__wrapped_original__ = old
    for mod in list(sys.modules.values()):
        if (
            isinstance(mod, types.ModuleType)
            and getattr(mod, "__name__", "").startswith("megatron.core")
            and getattr(mod, name, None) is old
        ):
            setattr(mod, name, new)
    _SITES.append((site, description))
    return True


def _wrap_function(module_name: str, name: str, make: Callable, site: str, description: str):
    """Rebind ``megatron.core.<module_name>.<name>`` to ``make(original)``, or record a skip."""
    module = _import(module_name)
    original = getattr(module, name, None) if module is not None else None
    if original is None:
        _SKIPPED.append((site, "absent"))
        return
    _rebind_function(module, name, make(original), site, description)


# --- replacement functions ------------------------------------------------------------------


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False, **_):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device: int = -1, graph_safe: bool = False, **_):
    torch.set_rng_state(new_state)


def _make_clip_grad_by_total_norm_fp32(original: Callable) -> Callable:
    from megatron.core.utils import to_local_if_dtensor

    @functools.wraps(original)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is None:
                continue
            allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
            assert grad.dtype in allowed, f"expected fp32 grads, got {grad.dtype}"
            grads.append(to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    return clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Within the block ``Tensor.cuda()`` returns the tensor (CPU-only build: it would raise)."""
    original = torch.Tensor.cuda

    def _identity(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = _identity
    try:
        yield
    finally:
        torch.Tensor.cuda = original


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _tensor_type_names_cuda():
    """Within the block ``Tensor.type()`` (no argument) names a CPU fp32/fp16/bf16 tensor by
    its CUDA type, ``"torch.cuda.BFloat16Tensor"`` for a CPU bf16 tensor. Megatron-Core's
    mixed-precision and distributed optimizers sort parameters by that string (fp32 main copy
    for 16-bit ones) and reject any other; the sort is the same on CPU. ``type(dtype)``
    conversions are untouched."""
    original = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = _CUDA_TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrap_method(module_name: str, class_name: str, method: str, make: Callable, site: str,
                 description: str) -> None:
    """Replace ``megatron.core.<module_name>.<class_name>.<method>`` by ``make(original)``."""
    module = _import(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    original = cls.__dict__.get(method) if cls is not None else None
    if original is None:
        _SKIPPED.append((site, "absent"))
        return
    setattr(cls, method, make(original))
    _SITES.append((site, description))


def _running_within(context: Callable) -> Callable[[Callable], Callable]:
    """`make(original)`: a wrapper that runs `original` inside `context()` (the original kept
    as ``__wrapped_original__``, which the tests call to show the defect)."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with context():
                return original(*args, **kwargs)

        wrapper.__wrapped_original__ = original
        return wrapper

    return make


_with_tensor_cuda_identity = _running_within(_tensor_cuda_is_identity)
_with_cuda_type_names = _running_within(_tensor_type_names_cuda)


BATCH_P2P_MESSAGE = (
    "batch_p2p_comm=True is not supported on the megatron_dots CPU backend: with gloo and "
    "pipeline parallelism torch.distributed.batch_isend_irecv silently corrupts received "
    "activations. Set ModelParallelConfig/TransformerConfig(batch_p2p_comm=False)."
)


def _install_cpu_record_stream() -> None:
    """``Tensor.record_stream`` returns without effect for non-CUDA tensors.

    The combined 1F1B schedule (``pipeline_parallel/utils.py:ScheduleNode._forward/_backward``,
    ``models/gpt/fine_grained_callables.py`` combine callable) calls ``t.record_stream(stream)``
    to keep the caching allocator from reusing memory another CUDA stream still reads. CPU
    tensors have no allocator streams and torch has no CPU kernel for it (``RuntimeError``), so
    on this backend (CPU-only processes) the call is a no-op for them; CUDA tensors, which
    cannot exist here, would still reach the original.
    """
    original = torch.Tensor.record_stream
    if getattr(original, "__megatron_dots_patched__", False):
        return

    @functools.wraps(original)
    def record_stream(self, stream):
        if self.device.type != "cuda":
            return None
        return original(self, stream)

    record_stream.__megatron_dots_patched__ = True
    record_stream.__wrapped_original__ = original
    torch.Tensor.record_stream = record_stream
    _SITES.append(("torch.Tensor.record_stream (used by megatron/core/pipeline_parallel/utils.py "
                   "and models/*/fine_grained_callables.py)",
                   "no-op for CPU tensors (torch has no CPU kernel; CPU work is synchronous)"))


def _make_uneven_gather(original: Callable) -> Callable:
    """`_gather_along_first_dim` that gathers unequal pieces on gloo (pad, gather, trim)."""

    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    return gather


def _make_p2p_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, pp_group, config, *args, **kwargs):
        if (
            getattr(config, "batch_p2p_comm", False)
            and pp_group is not None
            and pp_group.size() > 1
        ):
            raise ValueError(BATCH_P2P_MESSAGE)
        return original(self, pp_group, config, *args, **kwargs)

    __init__.__wrapped_original__ = original
    return __init__


def _is_megatron_compiled(obj) -> bool:
    orig = getattr(obj, "_torchdynamo_orig_callable", None)
    return orig is not None and getattr(orig, "__module__", "").startswith("megatron.core")


def _unwrap_jit_fuser() -> List[str]:
    """Undo ``megatron.core.jit.jit_fuser`` (= ``torch.compile``) on megatron functions.

    Returns the qualified names of the functions that were unwrapped.
    """
    done = []
    jit = _import("jit")
    if jit is not None and hasattr(jit, "disable_jit_fuser"):
        jit.disable_jit_fuser()  # modules imported from now on get the no-op decorator
    for mod in list(sys.modules.values()):
        mod_name = getattr(mod, "__name__", "")
        if not isinstance(mod, types.ModuleType) or not mod_name.startswith("megatron.core"):
            continue
        for attr, value in list(vars(mod).items()):
            if callable(value) and _is_megatron_compiled(value):
                orig = value._torchdynamo_orig_callable
                setattr(mod, attr, orig)
                done.append(f"{orig.__module__}.{orig.__qualname__}")
            elif isinstance(value, type) and value.__module__ == mod_name:
                for cattr, cvalue in list(vars(value).items()):
                    if isinstance(cvalue, (staticmethod, classmethod)):
                        inner = cvalue.__func__
                        if _is_megatron_compiled(inner):
                            setattr(value, cattr, type(cvalue)(inner._torchdynamo_orig_callable))
                            done.append(f"{mod_name}.{value.__qualname__}.{cattr}")
                    elif callable(cvalue) and _is_megatron_compiled(cvalue):
                        setattr(value, cattr, cvalue._torchdynamo_orig_callable)
                        done.append(f"{mod_name}.{value.__qualname__}.{cattr}")
    return sorted(set(done))


# --- main entry ------------------------------------------------------------------------------


def enable_cpu_backend() -> bool:
    """Patch the listed megatron-core sites so the training path runs on CPU.

    Returns True when the backend is active after the call, False (and does nothing) when
    CUDA is available. Idempotent.
    """
    global _ACTIVE, _CUDA_NS
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ACTIVE:
            return True
        _CUDA_NS = _CpuCudaNamespace(torch.cuda)
        proxy = _TorchProxy(_CUDA_NS)

        for name, why in PROXIED_MODULES:
            site = f"megatron/core/{name.replace('.', '/')}.py"
            mod = _import(name)
            if mod is None:
                continue
            current = getattr(mod, "torch", None)
            if current is torch:
                mod.torch = proxy
                _SITES.append((f"{site}: module global `torch`", f"CPU torch proxy ({why})"))
            elif isinstance(current, _TorchProxy):
                pass
            else:
                _SKIPPED.append((site, "module has no global `torch`"))

        random_mod = _import("tensor_parallel.random")
        _rebind_function(
            random_mod,
            "_get_cuda_rng_state",
            _cpu_get_rng_state,
            "megatron/core/tensor_parallel/random.py:_get_cuda_rng_state",
            "returns torch.get_rng_state() (CPU generator) instead of the CUDA generator state",
        )
        _rebind_function(
            random_mod,
            "_set_cuda_rng_state",
            _cpu_set_rng_state,
            "megatron/core/tensor_parallel/random.py:_set_cuda_rng_state",
            "torch.set_rng_state() instead of torch.cuda._lazy_call (never runs without CUDA)",
        )

        _wrap_function(
            "optimizer.clip_grads",
            "clip_grad_by_total_norm_fp32",
            _make_clip_grad_by_total_norm_fp32,
            "megatron/core/optimizer/clip_grads.py:clip_grad_by_total_norm_fp32 "
            "(+ rebound in optimizer/optimizer.py)",
            "accepts CPU fp32 grads (upstream asserts type 'torch.cuda.FloatTensor')",
        )

        for module_name, class_name in (("optimizer.optimizer", "Float16OptimizerWithFloat16Params"),
                                        ("optimizer.distrib_optimizer", "DistributedOptimizer")):
            _wrap_method(
                module_name, class_name, "__init__", _with_cuda_type_names,
                f"megatron/core/{module_name.replace('.', '/')}.py:{class_name}.__init__",
                "Tensor.type() names CPU fp32/bf16/fp16 tensors by their CUDA type during the "
                "call (upstream sorts parameters by 'torch.cuda.*Tensor' and rejects others)",
            )

        _wrap_method(
            "optimizer.distrib_optimizer", "DistributedOptimizer", "get_parameter_state_dp_zero",
            _with_tensor_cuda_identity,
            "megatron/core/optimizer/distrib_optimizer.py:"
            "DistributedOptimizer.get_parameter_state_dp_zero",
            "Tensor.cuda is identity during the call (the fully reshardable checkpoint format "
            "moves each state shard to the GPU before its all-gather)",
        )

        _wrap_method(
            "optimizer.grad_scaler", "DynamicGradScaler", "load_state_dict",
            _with_tensor_cuda_identity,
            "megatron/core/optimizer/grad_scaler.py:DynamicGradScaler.load_state_dict",
            "Tensor.cuda is identity during the call (the restored fp16 loss scale is moved "
            "with .cuda(current_device))",
        )

        _wrap_method(
            "models.common.language_module.language_module", "LanguageModule",
            "setup_embeddings_and_output_layer", _with_tensor_cuda_identity,
            "megatron/core/models/common/language_module/language_module.py:"
            "LanguageModule.setup_embeddings_and_output_layer",
            "Tensor.cuda is identity during the call (weight.data.cuda() before the "
            "tied-embedding all-reduce)",
        )

        _wrap_function(
            "tensor_parallel.data",
            "broadcast_data",
            _with_tensor_cuda_identity,
            "megatron/core/tensor_parallel/data.py:broadcast_data",
            "Tensor.cuda is identity during the call (upstream flattens data[key].cuda())",
        )
        _wrap_function(
            "tensor_parallel.mappings",
            "_gather_along_first_dim",
            _make_uneven_gather,
            "megatron/core/tensor_parallel/mappings.py:_gather_along_first_dim",
            "unequal output_split_sizes: pad, all_gather, trim (gloo needs equal sizes)",
        )

        _wrap_method(
            "pipeline_parallel.p2p_communication", "P2PCommunicator", "__init__",
            _make_p2p_init,
            "megatron/core/pipeline_parallel/p2p_communication.py:P2PCommunicator.__init__",
            "raises ValueError for batch_p2p_comm=True with PP>1 (gloo corrupts it)",
        )

        _install_cpu_record_stream()

        for qualname in _unwrap_jit_fuser():
            _SITES.append(
                (
                    qualname,
                    "jit_fuser (torch.compile) removed: eager original (inductor compile costs "
                    "~30 s per process on CPU for no benefit at test sizes)",
                )
            )

        _ACTIVE = True
        return True
