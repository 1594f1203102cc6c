"""What each layer and model chunk keeps for backward under parallel layouts, measured with the
saved-tensor counter (torchrun worker for tests/test_plan_activations.py).

--cases is a JSON list of cases, run one after another in this one launch (the parallel state
is re-initialised per case): ``{"id", "preset", "overrides", "layout": {"tp", "pp", "vpp",
"ep", "sp"}, "dtype": "fp32" | "bf16", "backend", "shapes": [[b, s], ...], "modes": [...],
"micro_batches", "chunk_modes"}``. For every shape and recompute mode, every layer of this rank
runs in that mode (`recompute.layer.set_modes`; mode ``planned``: the layer modes
``chunk_modes[pp_rank][chunk]``, e.g. a plan of `megatron_dots.plan.activations`) through
Megatron-Core's schedule (`training.forward_backward`, GPT dataset batches with a loss mask),
and each (micro-batch, chunk) forward, loss function included, counts its saved bytes per
(layer, region) (`recompute.measure.SavedBytes`, as the recompute controller does). The token
copies each MoE layer's experts receive are recorded too (the routing imbalance of the step).
Rank 0 writes every rank's records to --out.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_dots  # noqa: E402,F401  (compat patches first)
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_dots.compat.distributed import init_distributed  # noqa: E402
from megatron_dots.config import DotsConfig  # noqa: E402
from megatron_dots.convert.sharding import unwrap_model  # noqa: E402
from megatron_dots.model import build_dots_model_chunks  # noqa: E402
from megatron_dots.recompute.layer import decoder_layers, set_modes  # noqa: E402
from megatron_dots.recompute.measure import OUTSIDE, SavedBytes, active_counter  # noqa: E402
from megatron_dots.training import forward_backward, wrap_with_ddp  # noqa: E402
from worker_common import run_and_exit  # noqa: E402


class Counting:
    """Stands in for a recompute controller in `forward_backward`: applies one mode to every
    layer and counts each (micro-batch, chunk) forward's saved bytes."""

    def __init__(self, chunks, mode, chunk_modes=None):
        self.chunks = chunks
        self.mode = mode
        self.chunk_modes = chunk_modes
        self.blank = [SavedBytes(c.parameters()) for c in chunks]
        self.next = [0] * len(chunks)
        self.records = []
        self.current = None
        for chunk in chunks:
            for layer in decoder_layers(chunk):
                layer.install_recompute_regions()
                if layer.is_moe:
                    layer.mlp.experts.register_forward_pre_hook(self._received(layer))

    def _received(self, layer):
        def hook(module, args):
            if active_counter() is not None and self.current is not None:
                self.current["received"][str(layer.layer_number)] = int(args[0].shape[0])
        return hook

    def begin_step(self, micro_batches, forward_only=False):
        return None

    def end_step(self):
        self.current = None

    def wrap(self, forward_step_func):
        def forward_step(data_iterator, model):
            c = next(i for i, chunk in enumerate(self.chunks) if chunk is model)
            if self.mode == "planned":
                set_modes(model, self.chunk_modes[c])
            else:
                set_modes(model, [self.mode] * len(decoder_layers(model)))
            counter = self.blank[c].fork()
            record = {"mb": self.next[c], "chunk": c, "received": {}}
            self.next[c] += 1
            self.current = record
            with counter.counting():
                output, loss_func = forward_step_func(data_iterator, model)

            def counted_loss(output_tensor):
                with counter.counting():
                    return loss_func(output_tensor)

            record["counter"] = counter
            self.records.append(record)
            return output, counted_loss

        return forward_step

    def results(self):
        out = []
        for record in self.records:
            counter = record.pop("counter")
            model = unwrap_model(self.chunks[record["chunk"]])
            layers = {}
            for layer in decoder_layers(self.chunks[record["chunk"]]):
                layers[str(layer.layer_number)] = dict(counter.layer_bytes(layer.layer_number),
                                                       kind=layer.kind)
            out.append(dict(record, layers=layers, outside=counter.bytes.get(OUTSIDE, 0),
                            total=counter.total(), pre=bool(model.pre_process),
                            post=bool(model.post_process)))
        return out


def batches(cfg, b, s, count, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(b, s),
                    "position_ids": torch.arange(s).expand(b, s).contiguous()})
    return out


def run_case(case):
    lay = case["layout"]
    sizes = dict(tensor_model_parallel_size=lay.get("tp", 1),
                 pipeline_model_parallel_size=lay.get("pp", 1),
                 virtual_pipeline_model_parallel_size=lay.get("vpp"),
                 expert_model_parallel_size=lay.get("ep", 1))
    parallel_state.initialize_model_parallel(**sizes)
    model_parallel_cuda_manual_seed(11)
    cfg = DotsConfig.preset(case["preset"], **case.get("overrides", {}))
    dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    tc = cfg.to_transformer_config(**sizes, sequence_parallel=bool(lay.get("sp")),
                                   bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                   pipeline_dtype=dtype, batch_p2p_comm=False)
    torch.manual_seed(5)
    chunks = wrap_with_ddp(build_dots_model_chunks(cfg, tc, backend=case.get("backend", "grouped")),
                           tc)
    dp_rank = parallel_state.get_data_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    planned = (case.get("chunk_modes") or {}).get(str(pp_rank))
    micro_batches = case.get("micro_batches", 1)
    results = []
    for b, s in case["shapes"]:
        data = batches(cfg, b, s, micro_batches, seed=1000 * dp_rank + s + b)
        for mode in case["modes"]:
            counting = Counting(chunks, mode, planned)
            forward_backward(chunks, data, s, b, recompute=counting)
            for record in counting.results():
                results.append(dict(record, case=case["id"], shape=[b, s], mode=mode))
    ranks = dict(
        rank=torch.distributed.get_rank(),
        pp_rank=pp_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_rank=dp_rank,
    )
    parallel_state.destroy_model_parallel()
    return [dict(r, **ranks) for r in results]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", required=True, help="JSON file: the list of cases")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    with open(args.cases) as handle:
        cases = json.load(handle)
    mine = []
    for case in cases:
        mine += run_case(case)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump([r for rank in everyone for r in rank], handle)
    return 0


if __name__ == "__main__":
    run_and_exit(main)
