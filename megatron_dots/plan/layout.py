"""One candidate training layout for `megatron-dots plan`: the parallel sizes, batch shape,
precision and schedule options, checked against Megatron-Core's rules, and rendered as the
`pretrain` flags that run it.

Sizes follow Megatron-Core: the world is TP x PP x DP; the experts see the same GPUs as
expert-TP (= TP in megatron-dots) x EP x PP x expert-DP, so EP must divide DP. Each pipeline
rank holds `vpp` model chunks of `layers_per_chunk` layers; the global stage of chunk c on
pipeline rank r is c x PP + r (the embedding lives on stage 0, the output layer and loss on the
last stage). Ranks on one pipeline stage are alike (TP shards and EP groups are even), so a
layout has PP distinct rank kinds.
"""

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

from ..config import DotsConfig, DotsConfigError

PRECISIONS = ("bf16", "fp16", "fp32")

# How each field is spelled on the `pretrain` command line (Megatron-LM names).
FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "vpp": "--virtual-pipeline-model-parallel-size",
    "ep": "--expert-model-parallel-size",
    "micro_batch_size": "--micro-batch-size",
    "global_batch_size": "--global-batch-size",
    "seq_length": "--seq-length",
    "gpus": "--gpus",
}


class LayoutError(ValueError):
    """A layout Megatron-Core cannot build; the message names the rule and the flags."""


@dataclass(frozen=True)
class Layout:
    """A training layout on `gpus` GPUs (see module docstring)."""

    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (1: no interleaving)
    ep: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    sequence_parallel: Optional[bool] = None  # None: on when TP > 1
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False  # --overlap-grad-reduce / --overlap-param-gather (buckets)
    precision: str = "bf16"
    a2a_overlap: bool = False
    delay_wgrad: bool = False
    recompute_budget_gib: Optional[float] = None  # the planner's budget; None: no recompute

    # ---------------------------------------------------------------- derived sizes
    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.gpus // (self.tp * self.ep * self.pp)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    @property
    def schedule(self) -> str:
        """The simulator's schedule name (`schedule.simulator.SCHEDULES`)."""
        if self.a2a_overlap:
            return "overlap"
        return "interleaved" if self.vpp > 1 else "1f1b"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def layers_per_chunk(self, cfg: DotsConfig) -> int:
        return cfg.num_layers // (self.pp * self.vpp)

    def stage_layers(self, cfg: DotsConfig, pp_rank: int) -> List[range]:
        """The 0-based layer numbers of each model chunk of pipeline rank `pp_rank`."""
        per = self.layers_per_chunk(cfg)
        return [range((c * self.pp + pp_rank) * per, (c * self.pp + pp_rank + 1) * per)
                for c in range(self.vpp)]

    # ------------------------------------------------------------------------ checks
    def check(self, cfg: DotsConfig) -> "Layout":
        """Raise LayoutError naming every broken rule and its flags; returns self."""
        problems = []
        for name in ("gpus", "tp", "pp", "vpp", "ep", "micro_batch_size", "global_batch_size",
                     "seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{FLAGS[name]} {getattr(self, name)}: must be at least 1")
        if problems:
            raise LayoutError("; ".join(problems))
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        try:
            cfg.check_parallel_layout(self.tp, self.pp, self.ep,
                                      self.vpp if self.vpp > 1 else None)
        except DotsConfigError as err:
            problems.append(str(err))
        if self.gpus % (self.tp * self.pp):
            problems.append(f"--gpus {self.gpus} is not a multiple of {FLAGS['tp']} {self.tp} x "
                            f"{FLAGS['pp']} {self.pp} (the data-parallel size must be whole)")
        elif self.dp % self.ep:
            problems.append(f"{FLAGS['ep']} {self.ep} does not divide the data-parallel size "
                            f"{self.dp} (= --gpus {self.gpus} / (TP {self.tp} x PP {self.pp})): "
                            "Megatron-Core lays expert-TP x EP x PP over the same GPUs")
        elif self.global_batch_size % (self.micro_batch_size * self.dp):
            problems.append(f"{FLAGS['global_batch_size']} {self.global_batch_size} is not a "
                            f"multiple of {FLAGS['micro_batch_size']} {self.micro_batch_size} x "
                            f"data-parallel size {self.dp}")
        elif self.vpp > 1 and self.num_micro_batches % self.pp:
            problems.append(f"interleaved pipelining needs the micro-batches per step "
                            f"({self.num_micro_batches}) divisible by {FLAGS['pp']} {self.pp}")
        if self.sequence_parallel and self.tp == 1:
            problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sp and self.seq_length % self.tp:
            problems.append(f"{FLAGS['seq_length']} {self.seq_length} is not a multiple of "
                            f"{FLAGS['tp']} {self.tp} (sequence parallelism splits it)")
        if self.seq_length > cfg.max_position_embeddings:
            problems.append(f"{FLAGS['seq_length']} {self.seq_length} exceeds the model's "
                            f"max_position_embeddings {cfg.max_position_embeddings}")
        if self.a2a_overlap and self.ep == 1:
            problems.append("--dots-a2a-overlap needs --expert-model-parallel-size > 1")
        if self.a2a_overlap and self.pp > 1 and self.vpp == 1:
            problems.append("--dots-a2a-overlap with pipeline parallelism needs "
                            "--virtual-pipeline-model-parallel-size > 1 (Megatron-Core's "
                            "combined 1F1B runs on the interleaved schedule)")
        if self.delay_wgrad and not self.a2a_overlap:
            problems.append("--delay-wgrad-compute needs --dots-a2a-overlap")
        if self.recompute_budget_gib is not None and self.recompute_budget_gib <= 0:
            problems.append(f"--dots-recompute-budget-gb {self.recompute_budget_gib}: must be > 0")
        if problems:
            raise LayoutError("; ".join(problems))
        return self

    # ------------------------------------------------------------------------- output
    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        parts += [f"EP{self.ep}", f"DP{self.dp}", f"mbs{self.micro_batch_size}"]
        if self.a2a_overlap:
            parts.append("a2a-overlap")
        if self.recompute_budget_gib is not None:
            parts.append(f"recompute<={self.recompute_budget_gib:g}GiB")
        return " ".join(parts)

    def pretrain_flags(self) -> List[str]:
        """The `megatron-dots pretrain` flags of this layout (model and data flags not
        included)."""
        flags = [FLAGS["tp"], str(self.tp), FLAGS["pp"], str(self.pp)]
        if self.vpp > 1:
            flags += [FLAGS["vpp"], str(self.vpp)]
        flags += [FLAGS["ep"], str(self.ep), FLAGS["micro_batch_size"],
                  str(self.micro_batch_size), FLAGS["global_batch_size"],
                  str(self.global_batch_size), FLAGS["seq_length"], str(self.seq_length)]
        if self.sp:
            flags.append("--sequence-parallel")
        if self.precision != "fp32":
            flags.append(f"--{self.precision}")
        if self.distributed_optimizer:
            flags.append("--use-distributed-optimizer")
        if self.overlap_grad_reduce:
            flags.append("--overlap-grad-reduce")
            if self.distributed_optimizer:
                flags.append("--overlap-param-gather")
        if self.a2a_overlap:
            flags.append("--dots-a2a-overlap")
        if self.delay_wgrad:
            flags.append("--delay-wgrad-compute")
        if self.recompute_budget_gib is not None:
            flags += ["--dots-recompute-budget-gb", f"{self.recompute_budget_gib:g}"]
        return flags

    def to_dict(self) -> Dict:
        out = asdict(self)
        out.update(dp=self.dp, expert_dp=self.expert_dp, sequence_parallel=self.sp,
                   num_micro_batches=self.num_micro_batches, schedule=self.schedule)
        return out

    def replace(self, **changes) -> "Layout":
        return replace(self, **changes)
