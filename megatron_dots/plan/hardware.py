"""The GPU and network a plan is priced against: peaks, bandwidths and the achievable
fractions of them that the step-time roofline (`step_time.py`) uses.

Units: TFLOPS (10^12 FLOP/s, dense bf16 tensor-core peak per GPU, no sparsity) and GB/s
(10^9 bytes/s). `intra_node_gbps` is one direction of one GPU's NVLink bandwidth (the H100 SXM's
900 GB/s NVLink is 450 GB/s each way); `inter_node_gbps` is one GPU's share of the scale-out
network (one 400 Gb/s NIC per GPU = 50 GB/s). `memory_gib` is the GPU memory as CUDA reports
its total capacity (what an out-of-memory message calls it): 79.1 GiB for the 80 GB parts,
139.8 GiB for the 141 GB H200.

Efficiency factors (what a well-tuned kernel or collective reaches; every one is a field that a
preset or the caller may override):

* `gemm_efficiency` 0.75: large bf16 GEMMs from cuBLAS on Hopper reach 650-800 of 989 TFLOPS.
* `grouped_gemm_efficiency` 0.70 and `grouped_gemm_half_tokens` 128: the routed experts' grouped
  GEMM reaches `grouped_gemm_efficiency * m / (m + grouped_gemm_half_tokens)` of the peak with
  m tokens per expert: 0.62 at m = 1024 and 0.66 at m = 2048, the Transformer Engine 2.1 column
  of the dots.llm1 report's Table 1 (H800, bf16: 580-660 TFLOPS for m = 1024-2048; the report's
  own kernel reaches 640-745). Small per-expert batches lose efficiency (tile padding, one wave
  of thread blocks per expert); the rule halves it at 128 tokens.
* `attention_efficiency` 0.5: causal flash attention (cuDNN / FlashAttention), head dim 128,
  forward and backward together, 8K tokens.
* `a2a_efficiency` 0.6: NCCL all-to-all bus bandwidth against the link's bandwidth.
* `collective_efficiency` 0.8: ring all-gather / reduce-scatter / all-reduce and pipeline
  send/receive against the link's bandwidth.
* `hbm_efficiency` 0.8: memory-bound kernels (norms, RoPE, SwiGLU, permutations, Adam) against
  the HBM peak.
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict

EFFICIENCIES = ("gemm_efficiency", "grouped_gemm_efficiency", "attention_efficiency",
                "a2a_efficiency", "collective_efficiency", "hbm_efficiency")
RATES = ("peak_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps", "memory_gib",
         "grouped_gemm_half_tokens")


class HardwareError(ValueError):
    """A Hardware that cannot exist; the message names the field."""


@dataclass(frozen=True)
class Hardware:
    """One GPU model and its network (see the module docstring for units and defaults)."""

    peak_tflops: float
    hbm_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int = 8
    memory_gib: float = 79.1
    gemm_efficiency: float = 0.75
    grouped_gemm_efficiency: float = 0.70
    grouped_gemm_half_tokens: float = 128.0
    attention_efficiency: float = 0.5
    a2a_efficiency: float = 0.6
    collective_efficiency: float = 0.8
    hbm_efficiency: float = 0.8
    name: str = "custom"

    def __post_init__(self):
        for name in RATES + EFFICIENCIES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HardwareError(f"Hardware.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise HardwareError(f"Hardware.{name} must be a finite number > 0, got {value!r}")
        for name in EFFICIENCIES:
            if getattr(self, name) > 1:
                raise HardwareError(f"Hardware.{name} is a fraction of the peak and must lie in "
                                    f"(0, 1], got {getattr(self, name)!r}")
        g = self.gpus_per_node
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise HardwareError(f"Hardware.gpus_per_node must be a positive integer, got {g!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "Hardware":
        """A named GPU (`HARDWARE_PRESETS`), with any field overridden."""
        key = name.lower()
        if key not in HARDWARE_PRESETS:
            raise HardwareError(f"unknown hardware preset {name!r}; choose one of "
                                f"{', '.join(sorted(HARDWARE_PRESETS))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise HardwareError(f"unknown Hardware field(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}")
        return replace(HARDWARE_PRESETS[key], **overrides)

    def replace(self, **changes) -> "Hardware":
        return replace(self, **changes)

    def to_dict(self) -> Dict:
        return asdict(self)


# H100 / H800 / H200 SXM: the same 989 TFLOPS dense bf16 tensor cores. The H800 is the H100
# with NVLink cut to 400 GB/s (200 each way); the H200 has 141 GB of HBM3e at 4.8 TB/s. All
# three with one 400 Gb/s InfiniBand / RoCE NIC per GPU, 8 GPUs per node (HGX).
HARDWARE_PRESETS = {
    "h100": Hardware(name="h100", peak_tflops=989.0, hbm_gbps=3350.0, intra_node_gbps=450.0,
                     inter_node_gbps=50.0, memory_gib=79.1),
    "h800": Hardware(name="h800", peak_tflops=989.0, hbm_gbps=3350.0, intra_node_gbps=200.0,
                     inter_node_gbps=50.0, memory_gib=79.1),
    "h200": Hardware(name="h200", peak_tflops=989.0, hbm_gbps=4800.0, intra_node_gbps=450.0,
                     inter_node_gbps=50.0, memory_gib=139.8),
}
PRESETS = HARDWARE_PRESETS
