"""`megatron_dots.plan.static_memory`: the plan's parameters, gradient buffers and optimizer
state per rank equal what Megatron-Core builds, to the byte. The built-model tests are marked
`heavy` (.ci/run runs them on megatron-core 0.16.1 and 0.19.2).

* Built models (torchrun, 4 CPU processes, one launch for all layouts): dots-tiny and a shrunk
  dots-mini under TP / PP / VPP / EP, bf16 and fp32, with and without the distributed optimizer
  and bucketed (overlapped) gradient reduction; per rank, the chunks' parameter names and
  shapes, parameter bytes, every DDP buffer's length and bucket boundaries, the distributed
  optimizer's parameter-buffer padding, and the fp32 main weights + Adam moments the optimizer
  holds after a step.
* dots.llm1: the preset's 142.77B / 14.02B, and the per-rank numbers of a 256-GPU layout add
  up to the model (plus vocab padding).
* Hand-computed cases of the buffer layout rules and of dots-tiny's parameter count.
"""

import json

import pytest

from launch import describe, torchrun
from megatron_dots.config import DotsConfig
from megatron_dots.plan.layout import Layout
from megatron_dots.plan.static_memory import (
    GradBuffer, buffer_layout, model_parameters, rank_grad_buffers, rank_parameters,
    rank_static_memory)

# Each runs on 4 ranks; "tiny" = dots-tiny, "mini" = dots-mini's structure at CPU size (see
# the worker). Small bucket sizes give several buckets, hence bucket-end padding.
CASES = [
    dict(name="tp2-ep2-bf16-distopt-buckets", model="tiny", backend="sequential", tp=2, pp=1,
         ep=2, precision="bf16", distributed_optimizer=True, overlap_grad_reduce=True,
         bucket_size=3000),
    dict(name="pp2-vpp2-ep2-fp32", model="mini", backend="grouped", tp=1, pp=2, vpp=2, ep=2,
         precision="fp32", distributed_optimizer=False, overlap_grad_reduce=False),
    dict(name="pp2-vpp2-ep2-bf16-distopt-buckets", model="tiny", backend="grouped", tp=1,
         pp=2, vpp=2, ep=2, precision="bf16", distributed_optimizer=True,
         overlap_grad_reduce=True, bucket_size=2000),
    dict(name="tp2-pp2-bf16-distopt-buckets", model="mini", backend="sequential", tp=2, pp=2,
         ep=1, precision="bf16", distributed_optimizer=True, overlap_grad_reduce=True,
         bucket_size=20000),
    dict(name="ep2-dp4-bf16-distopt-buckets", model="mini", backend="grouped", tp=1, pp=1,
         ep=2, precision="bf16", distributed_optimizer=True, overlap_grad_reduce=True,
         bucket_size=50000),
    dict(name="ep4-bf16", model="tiny", backend="sequential", tp=1, pp=1, ep=4,
         precision="bf16", distributed_optimizer=False, overlap_grad_reduce=False),
    dict(name="dp4-fp32-distopt", model="tiny", backend="sequential", tp=1, pp=1, ep=1,
         precision="fp32", distributed_optimizer=True, overlap_grad_reduce=False),
    dict(name="tp2-ep2-bf16-distopt", model="mini", backend="sequential", tp=2, pp=1, ep=2,
         precision="bf16", distributed_optimizer=True, overlap_grad_reduce=False),
    dict(name="pp2-ep2-bf16-distopt-default-buckets", model="mini", backend="sequential",
         tp=1, pp=2, ep=2, precision="bf16", distributed_optimizer=True,
         overlap_grad_reduce=True),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{case: [rank 0 result, ..., rank 3 result]} from one torchrun launch."""
    out = tmp_path_factory.mktemp("plan_static")
    proc = torchrun("parallel/plan_static_worker.py", 4, "--cases", json.dumps(CASES),
                    "--out", str(out), timeout=600)
    assert proc.returncode == 0, describe(proc)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    return {case["name"]: [rank[case["name"]] for rank in ranks] for case in CASES}


@pytest.mark.heavy
@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_plan_equals_the_built_model_to_the_byte(built, case):
    for rank, result in enumerate(built[case]):
        assert result["problems"] == [], f"rank {rank}: " + "\n".join(result["problems"])


@pytest.mark.heavy
def test_the_built_cases_exercise_padding_buckets_and_master_weights(built):
    """Guard against a vacuous comparison: some cases pad, split buckets, shard experts over
    expert-DP and keep fp32 main weights."""
    measured = [r["measured"] for results in built.values() for r in results]
    assert any(m["param_padding_bytes"] > 0 for m in measured)
    assert any(len(b["buckets"]) > 2 for m in measured for b in m["buffers"])
    assert any(b["expert_parallel"] and b["data_parallel_size"] > 1
               for m in measured for b in m["buffers"])
    assert any(m["master_bytes"] > 0 for m in measured)
    # Data-parallel ranks of one stage own different optimizer shards somewhere.
    shards = {case: {r["measured"]["optimizer_bytes"] for r in results}
              for case, results in built.items()}
    assert any(len(sizes) > 1 for sizes in shards.values())


# ------------------------------------------------------------------------ dots.llm1
LLM1_LAYOUT = Layout(gpus=256, tp=8, pp=2, ep=8, micro_batch_size=1, global_batch_size=1024,
                     seq_length=8192)


def test_dots_llm1_totals():
    cfg = DotsConfig.preset("dots.llm1")
    total, active = model_parameters(cfg)
    assert round(total / 1e9, 2) == 142.77
    assert round(active / 1e9, 2) == 14.02


@pytest.mark.parametrize("backend", ["sequential", "grouped", "te"])
def test_dots_llm1_ranks_add_up_to_the_model(backend):
    """Over the pipeline stages: TP-split tensors x TP, replicated ones once, routed experts
    x TP x EP give the model plus its vocab padding (embedding and output layer)."""
    cfg = DotsConfig.preset("dots.llm1")
    layout = LLM1_LAYOUT
    h, d, n_moe = cfg.hidden_size, cfg.kv_channels, cfg.num_layers - cfg.first_k_dense
    # Tensors every TP rank holds whole: two norms + q/k norms per layer, the router, the
    # final norm.
    replicated = cfg.num_layers * (2 * h + 2 * d) + n_moe * cfg.num_moe_experts * h + h
    summed = 0
    for pp_rank in range(layout.pp):
        static = rank_static_memory(cfg, layout, pp_rank, backend=backend)
        dense = static.parameters - static.expert_parameters
        summed += static.expert_parameters * layout.tp * layout.ep + dense * layout.tp
    summed -= replicated * (layout.tp - 1)
    padding = 2 * (cfg.padded_vocab_size(layout.tp) - cfg.vocab_size) * h
    assert summed == model_parameters(cfg)[0] + padding


def test_dots_llm1_static_memory_per_stage():
    """Stage 0 (embedding, dense layer 0 + 30 MoE layers) and stage 1 (31 MoE layers, final
    norm, output layer) under TP8 PP2 EP8 with the distributed optimizer over DP 16 (experts
    over expert-DP 2), bf16: parameters 2 B, fp32 gradients 4 B, and 12 B of optimizer state
    per parameter shared by the data-parallel ranks."""
    cfg = DotsConfig.preset("dots.llm1")
    layout = LLM1_LAYOUT
    assert (layout.dp, layout.expert_dp) == (16, 2)
    for pp_rank in range(2):
        static = rank_static_memory(cfg, layout, pp_rank, backend="sequential",
                                    overlap_grad_reduce=True)
        dense = static.parameters - static.expert_parameters
        assert static.param_bytes == 2 * static.parameters
        # Padding is a few elements per bucket at most.
        assert 4 * static.parameters <= static.grad_bytes < 4 * static.parameters + 4 * 2**20
        assert static.optimizer_bytes == pytest.approx(
            12 * (dense / 16 + static.expert_parameters / 2), rel=1e-4)
        assert static.total() == (static.param_bytes + static.param_padding_bytes
                                  + static.grad_bytes + static.optimizer_bytes)
    layers = [len(r) for c in [layout.stage_layers(cfg, p) for p in range(2)] for r in c]
    assert layers == [31, 31]


# ---------------------------------------------------------------- hand-computed cases
def test_buffer_layout_by_hand():
    """Three parameters of 100, 30 and 64 elements, placed last first."""
    # No distributed optimizer: packed, one bucket.
    assert buffer_layout([100, 30, 64], 2, None, False) == (
        [(94, 194, 0), (64, 94, 0), (0, 64, 0)], [(0, 194)])
    # Distributed optimizer: starts at multiples of 64, the end at a multiple of lcm(2, 128).
    assert buffer_layout([100, 30, 64], 2, None, True) == (
        [(128, 228, 0), (64, 94, 0), (0, 64, 0)], [(0, 256)])
    # Buckets of >= 90 elements: [64, 30] closes at 94 -> 128; [100] at 228 -> 256.
    assert buffer_layout([100, 30, 64], 2, 90, True) == (
        [(128, 228, 1), (64, 94, 0), (0, 64, 0)], [(0, 128), (128, 256)])
    # DP 3: bucket ends at multiples of lcm(3, 128) = 384.
    assert buffer_layout([100, 30, 64], 3, None, True)[1] == [(0, 384)]


def test_distributed_optimizer_shards_by_hand():
    """DP 2 over the 256-element bucket above: rank 0 owns [0, 128) (64 + 30 elements of
    parameters), rank 1 [128, 256) (the 100-element parameter; the rest is padding)."""
    ranges, buckets = buffer_layout([100, 30, 64], 2, None, True)
    buf = GradBuffer(0, False, 2, (), tuple(ranges), tuple(buckets))
    assert [buf.shard_range(0, r) for r in range(2)] == [(0, 128), (128, 256)]
    assert [buf.shard_numel(r) for r in range(2)] == [94, 100]


def test_distributed_optimizer_shards_count_every_element_once():
    """Against an element-by-element count: every parameter element belongs to exactly one
    rank's slice, padding to none."""
    import random

    rng = random.Random(7)
    for _ in range(30):
        numels = [rng.choice([1, 63, 64, 65, 127, 500, 4096]) for _ in range(rng.randint(1, 12))]
        dp = rng.choice([1, 2, 3, 4, 6, 16])
        bucket_size = rng.choice([None, 100, 1000])
        ranges, buckets = buffer_layout(numels, dp, bucket_size, True)
        buf = GradBuffer(0, False, dp, (), tuple(ranges), tuple(buckets))
        elements = {i for start, end, _ in ranges for i in range(start, end)}
        expected = [sum(len(elements & set(range(*buf.shard_range(b, r))))
                        for b in range(len(buckets))) for r in range(dp)]
        assert buf.shard_numels() == expected
        assert sum(expected) == sum(numels)


def test_dots_tiny_by_hand():
    """dots-tiny (hidden 64, 4 heads x 16, ffn 128, 8 experts x 32, 2 shared, vocab 512,
    4 layers: 1 dense + 3 MoE) on one GPU, bf16, plain optimizer."""
    cfg = DotsConfig.preset("dots-tiny")
    attention = 64 + 64 * 64 + 3 * 64 * 64 + 2 * 16 + 64  # norms, proj, qkv, q/k norms
    dense_mlp = 2 * 128 * 64 + 64 * 128
    moe = 8 * 64 + 8 * (2 * 32 * 64 + 64 * 32) + (2 * 64 * 64 + 64 * 64)
    total = 512 * 64 + 4 * attention + dense_mlp + 3 * moe + 64 + 512 * 64
    assert total == model_parameters(cfg)[0]
    static = rank_static_memory(cfg, Layout(gpus=1, seq_length=64, distributed_optimizer=False),
                                0, backend="sequential")
    assert static.parameters == total
    assert static.expert_parameters == 3 * 8 * 3 * 64 * 32
    assert static.param_bytes == 2 * total
    assert static.grad_bytes == 4 * total
    assert static.optimizer_bytes == 12 * total
    assert static.param_padding_bytes == 0


def test_experts_join_the_dense_buffer_without_expert_parallelism():
    cfg = DotsConfig.preset("dots-tiny")
    one = rank_grad_buffers(cfg, Layout(gpus=2, global_batch_size=2, seq_length=64), 0,
                            backend="grouped")
    two = rank_grad_buffers(cfg, Layout(gpus=2, ep=2, global_batch_size=2, seq_length=64), 0,
                            backend="grouped")
    assert [b.expert_parallel for b in one] == [False]
    assert [b.expert_parallel for b in two] == [False, True]
    assert two[1].data_parallel_size == 1


def test_chunks_follow_the_pipeline_layout():
    cfg = DotsConfig.preset("dots-tiny")
    layout = Layout(gpus=2, pp=2, vpp=2, global_batch_size=2, seq_length=64)
    first = [[p.name for p in chunk] for chunk in rank_parameters(cfg, layout, 0, "grouped")]
    last = [[p.name for p in chunk] for chunk in rank_parameters(cfg, layout, 1, "grouped")]
    assert first[0][0] == "embedding.word_embeddings.weight"
    assert not any(n.startswith("embedding") for n in first[1] + last[0] + last[1])
    assert last[1][-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert not any(n.startswith(("output_layer", "decoder.final")) for n in first[0] + first[1]
                   + last[0])
    # Layer 0 (dense) is chunk 0 of stage 0; every other chunk holds one MoE layer.
    assert "decoder.layers.0.mlp.linear_fc1.weight" in first[0]
    assert all("decoder.layers.0.mlp.router.weight" in c for c in (first[1], last[0], last[1]))


def test_bad_input():
    cfg = DotsConfig.preset("dots-tiny")
    with pytest.raises(ValueError, match="pp_rank 2"):
        rank_static_memory(cfg, Layout(gpus=2, pp=2, global_batch_size=2, seq_length=64), 2)
    with pytest.raises(ValueError, match="expert backend"):
        rank_parameters(cfg, Layout(gpus=1, seq_length=64), 0, "fast")
    with pytest.raises(ValueError, match="expert-model-parallel-size 3"):
        rank_static_memory(cfg, Layout(gpus=3, ep=3, global_batch_size=3, seq_length=64), 0)
