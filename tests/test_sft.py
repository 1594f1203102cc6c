"""`megatron-dots sft`: variable-length micro-batches, the per-token loss normalisation, the
training runs (learning, resume, layouts, planner), export and chat through transformers, and
bad flags. The data side (chat template, masks, cache) is tests/test_sft_data.py."""

import re

import numpy
import pytest
import torch

from megatron_dots.sft.batching import (
    SampleOrder,
    SFTBatchConfig,
    make_micro_batch,
    order_global_batch,
    rank_slots,
    split_conversations,
)


def _samples(count, seed, vocab, low=5, high=40):
    """(tokens, loss_mask) pairs of random lengths; every third has no trained token."""
    gen = numpy.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(gen.integers(low, high))
        tokens = gen.integers(0, vocab, n)
        mask = gen.random(n) < 0.5 if i % 3 else numpy.zeros(n, dtype=bool)
        out.append((tokens, mask))
    return out


def test_micro_batch_is_padded_to_its_own_longest_sample():
    cfg = SFTBatchConfig(micro_batch_size=2, seq_length=32, pad_multiple=8, pad_id=7)
    a = (numpy.arange(10), numpy.array([0] * 5 + [1] * 5, dtype=bool))
    b = (numpy.arange(100, 104), numpy.array([0, 1, 1, 1], dtype=bool))
    batch = make_micro_batch([a, b], cfg)
    assert batch["tokens"].shape == (2, 16)  # 9 inputs -> 16
    assert batch["tokens"][0, :9].tolist() == list(range(9))
    assert batch["labels"][0, :9].tolist() == list(range(1, 10))
    assert batch["loss_mask"][0].tolist() == [0.0] * 4 + [1.0] * 5 + [0.0] * 7
    assert batch["labels"][1, :3].tolist() == [101, 102, 103]
    assert batch["loss_mask"][1].tolist() == [1.0] * 3 + [0.0] * 13
    assert batch["padding_mask"][1].tolist() == [False] * 3 + [True] * 13
    assert (batch["tokens"][1, 3:] == 7).all()
    assert batch["position_ids"][1].tolist() == list(range(16))
    # Truncation: 50 tokens train their first seq_length + 1 = 33; the width stops at 32.
    long = (numpy.arange(50), numpy.ones(50, dtype=bool))
    batch = make_micro_batch([long], cfg)
    assert batch["tokens"].shape == (1, 32) and batch["labels"][0, -1].item() == 32


def test_sample_order_slots_and_split_are_deterministic():
    order = SampleOrder(numpy.array([3, 5, 9, 11]), seed=1)
    first = order.span(0, 8)
    assert sorted(first[:4]) == [3, 5, 9, 11] and sorted(first[4:]) == [3, 5, 9, 11]
    assert SampleOrder(numpy.array([3, 5, 9, 11]), seed=1).span(6, 2) == first[6:]
    assert first[:4] != first[4:] or first[:4] != SampleOrder(numpy.array([3, 5, 9, 11]),
                                                               seed=2).span(0, 4)
    assert rank_slots(8, 2, 1, 2) == [[2, 3], [6, 7]]
    lengths = numpy.array([5, 50, 20, 50])
    assert order_global_batch([0, 1, 2, 3], lengths, True) == [1, 3, 2, 0]
    train, valid = split_conversations(100, [90, 10, 0], seed=3)
    assert len(valid) == 10 and len(train) == 90 and not set(train) & set(valid)


def _per_token_model(cfg, seed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dots.model import build_dots_model_chunks

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    tc = cfg.to_transformer_config()
    tc.calculate_per_token_loss = True
    tc.variable_seq_lengths = True
    return tc, build_dots_model_chunks(cfg, tc, backend="sequential")


def _router_state(module):
    return {n: b.clone() for n, b in module.named_buffers() if "expert_bias" in n}


def test_gradient_is_the_mean_over_all_loss_tokens_however_the_batch_is_split(seeded):
    """One global batch of 8 variable-length samples, split 1x8, 2x4 and 4x2 (length-grouped
    or not), padded per micro-batch: the gradient equals an unpadded per-sample reference of
    sum(masked CE) / (all loss tokens), and the router counts no padding (same bias update)."""
    from megatron_dots.training import forward_backward, wrap_with_ddp
    from reference import tiny_config

    cfg = tiny_config(seq_aux_loss_coeff=0.0)  # the seq-wise balance loss is per micro-batch
    samples = _samples(8, seed=0, vocab=cfg.vocab_size)
    _, (reference,) = _per_token_model(cfg, seed=3)
    total = sum(int(m[1:].sum()) for _, m in samples)
    loss = 0.0
    routed = None
    for tokens, mask in samples:
        ids = torch.as_tensor(tokens, dtype=torch.long)
        out = reference(ids[None, :-1], torch.arange(len(ids) - 1)[None], None,
                        labels=ids[None, 1:])
        loss = loss + (out[0] * torch.as_tensor(mask[1:], dtype=torch.float)).sum()
    (loss / total).backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    ref_load = [r.take_expert_load() for r in _routers(reference)]

    tc, chunks = _per_token_model(cfg, seed=3)
    chunks = wrap_with_ddp(chunks, tc)
    start = _router_state(chunks[0].module)
    biases = []
    for mbs, grouped, padding in ((1, False, True), (2, True, True), (4, False, True),
                                  (4, True, False)):
        config = SFTBatchConfig(micro_batch_size=mbs, seq_length=64, pad_multiple=8, pad_id=0)
        order = order_global_batch(list(range(8)), numpy.array([len(t) for t, _ in samples]),
                                   grouped)
        batches = [make_micro_batch([samples[i] for i in order[k:k + mbs]], config)
                   for k in range(0, 8, mbs)]
        if not padding:  # the router counts padding without the mask: must show
            for b in batches:
                del b["padding_mask"]
        chunks[0].module.load_state_dict(start, strict=False)
        forward_backward(chunks, batches, max(b["tokens"].shape[1] for b in batches), mbs)
        load = [r.take_expert_load() for r in _routers(chunks[0].module)]
        if not padding:
            assert any(not torch.equal(a, b) for a, b in zip(load, ref_load))
            continue
        assert all(torch.equal(a, b) for a, b in zip(load, ref_load)), (mbs, grouped)
        for name, param in chunks[0].module.named_parameters():
            torch.testing.assert_close(param.main_grad, ref_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} (mbs {mbs}): {m}")
        biases.append(_router_state(chunks[0].module))
    assert all(torch.equal(biases[0][k], b[k]) for b in biases[1:] for k in b)
    assert any(not torch.equal(biases[0][k], start[k]) for k in start)  # the bias did move


def test_user_tokens_of_a_masked_out_sample_do_not_change_the_gradient(seeded):
    """Samples with no trained token (every third of `_samples`) get new random tokens: the
    gradient of the batch is bit-identical (per-row attention, per-token routing, no
    capacity; the seq-wise balance loss, which would see them, is off as above)."""
    from megatron_dots.training import forward_backward, wrap_with_ddp
    from reference import tiny_config

    cfg = tiny_config(seq_aux_loss_coeff=0.0)
    tc, chunks = _per_token_model(cfg, seed=4)
    chunks = wrap_with_ddp(chunks, tc)
    start = _router_state(chunks[0].module)
    config = SFTBatchConfig(micro_batch_size=3, seq_length=64, pad_multiple=8, pad_id=0)
    samples = _samples(6, seed=1, vocab=cfg.vocab_size)
    gen = numpy.random.default_rng(9)
    changed = [(gen.integers(0, cfg.vocab_size, len(t)), m) if not m.any() else (t, m)
               for t, m in samples]
    assert sum(not m.any() for _, m in samples) == 2
    grads = []
    for batch in (samples, changed):
        chunks[0].module.load_state_dict(start, strict=False)
        micro = [make_micro_batch(batch[k:k + 3], config) for k in (0, 3)]
        forward_backward(chunks, micro, max(b["tokens"].shape[1] for b in micro), 3)
        grads.append({n: p.main_grad.clone() for n, p in chunks[0].module.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def _routers(module):
    from megatron_dots.model.router import DotsRouter

    return [m for m in module.modules() if isinstance(m, DotsRouter)]


# -- end to end: `megatron-dots sft` -----------------------------------------------------------

import csv  # noqa: E402
import os  # noqa: E402

from launch import REPO_ROOT  # noqa: E402
from pretrain_runs import as_flags, run  # noqa: E402

EXAMPLE = os.path.join(REPO_ROOT, "examples", "sft_dots.py")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(tokenizer dir, train JSONL, held-out JSONL) for dots-tiny."""
    from reference import tiny_config
    from sft_data import chat_tokenizer, write_conversations

    root = tmp_path_factory.mktemp("chat")
    tokenizer = chat_tokenizer(str(root / "tokenizer"), tiny_config().vocab_size)
    return (tokenizer, write_conversations(str(root / "train.jsonl"), 64, seed=1),
            write_conversations(str(root / "held_out.jsonl"), 8, seed=2))


def sft_flags(chat, out, **changes):
    values = {
        "dots_model": "dots-tiny", "micro_batch_size": 2, "global_batch_size": 8,
        "seq_length": 96, "train_iters": 6, "lr": 3e-3, "min_lr": 3e-3,
        "lr_decay_style": "constant", "log_interval": 1, "seed": 7,
        "data_cache_path": out / "cache", "tokenizer_model": chat[0],
        "dots_sft_pad_multiple": 8, "dots_loss_csv": out / "losses.csv",
        "split": "90,10,0", "eval_interval": 4, "eval_iters": 1,
    }
    values.update(changes)
    return ["--data-path", chat[1]] + as_flags(values)


def run_sft(args, nproc=1, timeout=300, returncode=0):
    return run(args, nproc, timeout, returncode, script=EXAMPLE)


def losses(path):
    with open(path, newline="") as handle:
        return {int(r["iteration"]): float(r["loss"]) for r in csv.DictReader(handle)}


def _hf_losses(model, chat_format, conversations):
    """Mean CE of the assistant tokens and of all other tokens, over `conversations`."""
    sums = {True: [0.0, 0], False: [0.0, 0]}
    for conversation in conversations:
        ids, mask = chat_format.encode(conversation["messages"])
        ids = torch.tensor(ids)[None]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        for trained, value in zip(mask[1:], ce.tolist()):
            sums[bool(trained)][0] += value
            sums[bool(trained)][1] += 1
    return sums[True][0] / sums[True][1], sums[False][0] / sums[False][1]


def test_sft_learns_the_replies_exports_and_chats(chat, converted_start, tmp_path):
    """From a converted HF checkpoint: the assistant-token loss falls close to zero while the
    (untrained) loss on the noise user turns does not; the export chats through transformers'
    generate with the chat template and answers with the trained reply."""
    import json

    from transformers import AutoTokenizer, Dots1ForCausalLM

    from megatron_dots.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_dots.sft.chat_format import ChatFormat
    from sft_data import REPLY

    from reference import tiny_config
    from sft_data import chat_tokenizer

    # A tokenizer without a chat template, trained with the ChatML fallback: the checkpoint
    # carries the template (hf_assets/), so the export chats without a --tokenizer.
    plain = chat_tokenizer(str(tmp_path / "plain"), tiny_config().vocab_size, template=None)
    out = tmp_path / "run"
    proc = run_sft(sft_flags(chat, out, load=converted_start, save=out / "ckpt",
                             train_iters=30, dots_sft_length_grouped=True, log_interval=10,
                             tokenizer_model=plain, dots_chat_template="chatml"))
    assert "conversations" in proc.stdout and "loaded weights" in proc.stdout, proc.stdout
    trained = losses(out / "losses.csv")
    assert trained[30] < 0.05 * trained[1], trained
    hf = tmp_path / "hf"
    convert_mcore_to_hf(str(out / "ckpt"), str(hf), progress=False)
    model = Dots1ForCausalLM.from_pretrained(hf, local_files_only=True).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    held_out = [json.loads(line) for line in open(chat[2])]
    assert tokenizer.chat_template  # the ChatML fallback, carried through the export
    assistant, other = _hf_losses(model, ChatFormat(str(hf)), held_out)
    assert assistant < 0.1 and other > 2.0, (assistant, other)
    prompt = tokenizer.apply_chat_template(held_out[0]["messages"][:-1],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:],
                             skip_special_tokens=True)
    assert reply.strip().startswith(REPLY), reply


@pytest.fixture(scope="module")
def reference_run(chat, converted_start, tmp_path_factory):
    """One process, 8 steps from the converted checkpoint (every layout starts from the same
    weights), length-grouped variable-length micro-batches: the losses every other run must
    reproduce."""
    out = tmp_path_factory.mktemp("sft_reference")
    proc = run_sft(sft_flags(chat, out, train_iters=8, dots_sft_length_grouped=True,
                             load=converted_start))
    return losses(out / "losses.csv"), proc.stdout


def test_sft_log_counts_and_normalisation(reference_run):
    _, stdout = reference_run
    assert "sft data: 64 conversations" in stdout and "0 without an assistant turn" in stdout
    assert "58 train, 6 validation" in stdout
    assert "validation at iteration 4 | lm loss" in stdout, stdout


def test_sft_resume_and_planner_reproduce_the_uninterrupted_run(chat, reference_run,
                                                               converted_start, tmp_path):
    """Stopped after 4 steps and resumed: the same losses as the uninterrupted run; and the
    recompute planner under a budget that makes it recompute changes no loss."""
    expected, _ = reference_run
    out = tmp_path / "resumed"
    # Megatron-LM's requeue idiom: the same command twice; the first job starts from
    # --pretrained-checkpoint, the second resumes --load.
    common = dict(train_iters=8, dots_sft_length_grouped=True, save=out / "ckpt",
                  load=out / "ckpt", pretrained_checkpoint=converted_start)
    proc = run_sft(sft_flags(chat, out, exit_interval=4, **common))
    assert "starting from --pretrained-checkpoint" in proc.stdout, proc.stdout
    proc = run_sft(sft_flags(chat, out, **common))
    assert "resumed from" in proc.stdout
    assert losses(out / "losses.csv") == expected

    planned = tmp_path / "planned"
    proc = run_sft(sft_flags(chat, planned, train_iters=8, dots_sft_length_grouped=True,
                             dots_recompute_budget_gb=0.007, dots_recompute_bucket=8,
                             load=converted_start))
    assert losses(planned / "losses.csv") == expected
    shares = [float(x.split("layer passes recomputed ")[1].split("%")[0])
              for x in proc.stdout.splitlines() if "layer passes recomputed" in x]
    assert shares and max(shares) > 0, proc.stdout


@pytest.mark.parametrize("layout", [
    {"nproc": 2},
    {"nproc": 2, "expert_model_parallel_size": 2},
    {"nproc": 2, "pipeline_model_parallel_size": 2},
], ids=["dp2", "ep2", "pp2"])
def test_sft_layouts_give_the_one_process_losses(chat, reference_run, converted_start, tmp_path,
                                                layout):
    expected, _ = reference_run
    layout = dict(layout)
    nproc = layout.pop("nproc")
    run_sft(sft_flags(chat, tmp_path, train_iters=8, dots_sft_length_grouped=True,
                      load=converted_start, **layout), nproc=nproc)
    got = losses(tmp_path / "losses.csv")
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-5, abs=1e-6), step


@pytest.mark.parametrize("changes, world, message", [
    ({"dots_a2a_overlap": True, "expert_model_parallel_size": 2}, 2,
     "do not pass the padding mask to the router"),
    ({"mock_data": True}, 1, "--mock-data is not supported by sft"),
    ({"dots_batch_stages": "0:8"}, 1, "--dots-batch-stages is not supported by sft"),
    ({"tokenizer_type": "NullTokenizer", "vocab_size": 500}, 1, "chat template"),
    ({"sequence_parallel": True, "tensor_model_parallel_size": 2, "dots_sft_pad_multiple": 7},
     2, "--dots-sft-pad-multiple 7 must be a multiple of --tensor-model-parallel-size 2"),
    ({"dots_sft_pad_multiple": 0}, 1, "--dots-sft-pad-multiple must be >= 1"),
], ids=["a2a-overlap", "mock-data", "batch-stages", "null-tokenizer", "sp-multiple", "multiple"])
def test_bad_sft_flags_are_refused_naming_them(chat, tmp_path, changes, world, message):
    from megatron_dots.sft.arguments import parse_sft_args
    from megatron_dots.training.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_sft_args([str(a) for a in sft_flags(chat, tmp_path, **changes)], world)
    with pytest.raises(ArgumentError, match="no such file"):
        parse_sft_args([str(a) for a in sft_flags(chat, tmp_path)][2:] +
                       ["--data-path", str(tmp_path / "missing.jsonl")], 1)


def test_sft_bad_data_fails_before_training_naming_file_and_line(chat, tmp_path):
    """A malformed line, and a tokenizer without a chat template: exit 2, one line that names
    the file (and line), no cache left behind."""
    from sft_data import chat_tokenizer
    from reference import tiny_config

    bad = tmp_path / "bad.jsonl"
    good = open(chat[1]).read().splitlines()
    bad.write_text("\n".join(good[:3] + ['{"messages": [{"role": "user", "content": "hi"'])
                   + "\n")
    flags = [str(a) for a in sft_flags(chat, tmp_path)]
    flags[1] = str(bad)
    proc = run_sft(flags, returncode=2)
    assert f"{bad}:4" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not any((tmp_path / "cache").glob("*/tokens.npy"))

    plain = chat_tokenizer(str(tmp_path / "plain"), tiny_config().vocab_size, template=None)
    proc = run_sft([str(a) for a in sft_flags(chat, tmp_path, tokenizer_model=plain)],
                   returncode=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "tokenizer_config.json" in last and "chatml" in last, proc.stderr

    # Every conversation is longer than --seq-length + 1 tokens and dropped: nothing to train.
    proc = run_sft([str(a) for a in sft_flags(chat, tmp_path, seq_length=8,
                                              dots_sft_overlong="drop")], returncode=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "no conversation left to train on (64 conversations, 64 longer than" in last, last
