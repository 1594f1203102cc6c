"""Tail logits of a dots model that `analysis.model_source.load_model` loaded (an HF directory
or a Megatron checkpoint, one process or torchrun with TP / PP / EP), as the
`scoring.TailLogits` function.

Rows are cut into micro-batches that go round-robin to the data-parallel ranks (padded with
empty ones, so that every expert-parallel all-to-all runs equally often) through Megatron-Core's
forward-only pipeline schedule. A pre-hook on the output layer keeps only the last `tail`
positions of the final hidden states (gathering the sequence first under sequence
parallelism), so a 32K-token row costs logits of a few positions, not [32K, vocab]; the layer
then gathers the vocabulary over TP. The last pipeline stage's TP rank 0 of the owning DP rank
writes each row, and one all-reduce gives every rank all rows.
"""

from contextlib import contextmanager

import torch

from ..analysis.forward_pass import batch_windows as batch_rows  # round-robin over DP ranks
from ..storage.progress import progress_bar


def _gpt_model(chunk: torch.nn.Module):
    from megatron.core.models.gpt import GPTModel

    return next(m for m in chunk.modules() if isinstance(m, GPTModel))


@contextmanager
def _output_layer_reads_tail(gpt, window):
    """While active, the output layer sees hidden states [window[0]:window[1]] of the full
    sequence only; `window` is a mutable [start, stop] set before each pass."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    if not gpt.post_process:
        yield
        return
    layer = gpt.output_layer
    sequence_parallel = layer.sequence_parallel

    def select(module, args):
        hidden = args[0]
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden)
        return (hidden[window[0]:window[1]], *args[1:])

    handle = layer.register_forward_pre_hook(select)
    layer.sequence_parallel = False  # its input is now the full (selected) sequence
    try:
        yield
    finally:
        layer.sequence_parallel = sequence_parallel
        handle.remove()


class MegatronTailLogits:
    """`(rows [N, L], tail) -> logits [N, tail, vocab]` (float32, CPU, identical on all ranks)."""

    def __init__(self, model, micro_batch_size: int = 4, group: int = 8,
                 progress: bool = False):
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.group = group
        self.progress = progress

    def __call__(self, rows: torch.Tensor, tail: int) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model, mbs = self.model, self.micro_batch_size
        n, length = rows.shape
        if not 1 <= tail <= length:
            raise ValueError(f"tail {tail} outside 1..{length}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        padded = -(-length // tp) * tp  # sequence parallelism splits the sequence over TP
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        vocab = model.cfg.vocab_size
        writes = (parallel_state.is_pipeline_last_stage()
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
        result = torch.zeros(n, tail, vocab, dtype=torch.float32, device=model.device)
        batches = batch_rows(n, mbs, dp_size)
        rounds = len(batches) // dp_size
        positions = torch.arange(padded, device=model.device).expand(mbs, padded)

        def tokens_of(ids):
            tokens = torch.zeros(mbs, padded, dtype=torch.long)
            if ids:
                tokens[:len(ids), :length] = rows[ids]
            return ids, tokens.to(model.device)

        def forward_step(data_iterator, chunk):
            ids, tokens = next(data_iterator)
            output = chunk(tokens, positions, None, runtime_gather_output=True)

            def keep(logits):
                if writes and ids:
                    result[ids] = logits[:len(ids), :, :vocab].float()
                return torch.zeros((), device=model.device), {}

            return output, keep

        gpt = _gpt_model(model.chunk)
        show = self.progress and torch.distributed.get_rank() == 0
        with torch.no_grad(), _output_layer_reads_tail(gpt, [length - tail, length]), \
                progress_bar(n, "rows", unit="row", enabled=show) as bar:
            for start in range(0, rounds, self.group):
                stop = min(rounds, start + self.group)
                mine = [tokens_of(batches[r * dp_size + dp_rank]) for r in range(start, stop)]
                get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(mine),
                    model=model.chunk, num_microbatches=len(mine), seq_length=padded,
                    micro_batch_size=mbs, forward_only=True)
                bar.update(sum(len(ids) for ids in batches[start * dp_size:stop * dp_size]))
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(result)
        return result.cpu()
