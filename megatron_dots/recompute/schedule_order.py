"""The order in which one pipeline rank runs forward and backward passes in a training step.

Activations of a (micro-batch, model chunk) live from its forward to its backward, so the
peak activation memory of a rank depends on this order. It mirrors Megatron-Core's schedules
(`pipeline_parallel/schedules.py` and `combined_1f1b.py`, same in 0.16, 0.19 and 0.20):

* no pipelining: F0 B0 F1 B1 ...;
* 1F1B: `pp - rank - 1` warmup forwards, then F(k + warmup) B(k) pairs, then the cooldown;
* interleaved 1F1B: warmup `2 (pp - rank - 1) + (vpp - 1) * group` virtual micro-batches
  (`group` = `microbatch_group_size_per_vp_stage`, default pp), micro-batch and chunk of each
  virtual micro-batch from Megatron-Core's own `get_schedule_table`, backward chunks in reverse;
* the all-to-all overlap schedule (combined 1F1B, ``overlap=True``): interleaved 1F1B with one
  more warmup virtual micro-batch (`get_pp_rank_microbatches`:
  ``if overlap_moe_expert_parallel_comm: num_warmup_microbatches + 1``), and without pipelining
  F0, then F(k+1) paired with B(k), then the last backward alone
  (`combined_1f1b_schedule_for_no_pipelining`): two micro-batches in flight instead of one.
  A pair runs the forward and the backward layer by layer, interleaved; the events list the
  forward first, so the predicted peak holds both whole (an upper bound).
"""

from typing import List, Optional, Tuple

from megatron.core.pipeline_parallel.schedules import get_schedule_table

Event = Tuple[str, int, int]  # ("F" or "B", micro-batch, model chunk)


def schedule_events(
    num_microbatches: int,
    pp_size: int = 1,
    pp_rank: int = 0,
    vpp_size: Optional[int] = None,
    group_size: Optional[int] = None,
    extra_warmup: int = 0,
    overlap: bool = False,
) -> List[Event]:
    """Forward/backward events of pipeline rank `pp_rank`, in execution order (`overlap`:
    Megatron-Core's combined 1F1B, `overlap_moe_expert_parallel_comm`)."""
    if num_microbatches < 1:
        raise ValueError("a step has at least one micro-batch")
    interleaved = bool(vpp_size and vpp_size > 1)
    if overlap and pp_size > 1 and not interleaved:
        raise ValueError("Megatron-Core runs the all-to-all overlap schedule (combined 1F1B) "
                         "with pipeline parallelism only interleaved (virtual pipeline >= 2)")
    if pp_size == 1 and not interleaved:
        if overlap:  # combined 1F1B without pipelining: F0, F(k+1) with B(k), B(last)
            table, chunks, warmup = [(mb, 0) for mb in range(num_microbatches)], 1, 1
        else:
            events: List[Event] = []
            for mb in range(num_microbatches):
                events += [("F", mb, 0), ("B", mb, 0)]
            return events
    elif not interleaved:
        table = [(mb, 0) for mb in range(num_microbatches)]
        chunks, warmup = 1, pp_size - pp_rank - 1
    else:
        group = group_size or pp_size
        table = get_schedule_table(num_microbatches, vpp_size, group)
        chunks = vpp_size
        warmup = 2 * (pp_size - pp_rank - 1) + (vpp_size - 1) * group + extra_warmup
        warmup += 1 if overlap else 0
    total = len(table)
    warmup = min(warmup, total)

    def forward(k):
        mb, chunk = table[k]
        return ("F", mb, chunk)

    def backward(k):
        mb, chunk = table[k]
        return ("B", mb, chunks - 1 - chunk)

    events = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        events += [forward(warmup + k), backward(k)]
    events += [backward(k) for k in range(total - warmup, total)]
    return events


def max_in_flight(events: List[Event]) -> int:
    """Most (micro-batch, chunk) activations alive at once."""
    live = peak = 0
    for kind, _, _ in events:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
