"""examples/slurm/*.sbatch: bash syntax, and the training flags they pass pass megatron-dots'
own argument validation for the world size their #SBATCH lines ask for.

Each script prints its argument array (NUL-separated) and stops when DOTS_SBATCH_PRINT_ARGS=1,
so the flags checked here are exactly the ones bash would pass, variables expanded. Paths are
replaced by temporary files.
"""

import os
import re
import shutil
import subprocess

import pytest

from megatron_dots.training import arguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "examples", "slurm")
TRAINING = ("dots_llm1.sbatch", "dots_mini_1node.sbatch")
ALL = TRAINING + ("dots_llm1_sft.sbatch", "preprocess.sbatch", "utk.sbatch")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def script(name):
    return os.path.join(SLURM, name)


def sbatch_option(name, option):
    """Value of `#SBATCH --option=value` in the script."""
    with open(script(name)) as handle:
        found = re.findall(rf"^#SBATCH\s+--{option}[= ](\S+)", handle.read(), re.MULTILINE)
    assert len(found) == 1, f"{name}: expected one #SBATCH --{option}"
    return found[0]


def world_size(name):
    return int(sbatch_option(name, "nodes")) * int(sbatch_option(name, "ntasks-per-node"))


def printed_args(name, env):
    result = subprocess.run(
        ["bash", script(name)],
        env={"PATH": os.environ["PATH"], "DOTS_SBATCH_PRINT_ARGS": "1", **env},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, f"{name}: {result.stderr}"
    return result.stdout.split("\0")[:-1]


@pytest.fixture
def paths(tmp_path):
    """Stand-ins for DATA (a .bin/.idx pair), TOKENIZER (a directory) and CKPT."""
    for ext in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{ext}").write_bytes(b"")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "ckpt").mkdir()
    return {"DATA": str(tmp_path / "corpus_text_document"),
            "TOKENIZER": str(tmp_path / "tokenizer"), "CKPT": str(tmp_path / "ckpt")}


def validated(argv, world):
    """megatron-dots' parse + validate_args (which also checks megatron-core's expert grid)."""
    args = arguments.build_parser().parse_args(argv)
    arguments.validate_args(args, world_size=world)
    return args


@pytest.mark.parametrize("name", ALL)
def test_scripts_are_valid_bash(name):
    result = subprocess.run(["bash", "-n", script(name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", TRAINING)
def test_scripts_save_on_sigterm_and_resume_from_the_same_directory(name, paths):
    assert sbatch_option(name, "signal").startswith("SIGTERM@")
    argv = printed_args(name, paths)
    assert "--exit-signal-handler" in argv and "--save-interval" in argv
    assert argv[argv.index("--save") + 1] == argv[argv.index("--load") + 1] == paths["CKPT"]


@pytest.mark.parametrize("tp", ["8", "4"])
@pytest.mark.parametrize("phase", ["main", "anneal2"])
def test_dots_llm1_layout_and_schedule_validate(paths, tp, phase):
    name = "dots_llm1.sbatch"
    args = validated(printed_args(name, {**paths, "DOTS_TP": tp, "PHASE": phase}),
                     world_size(name))
    cfg = args.dots_config
    assert (cfg.num_layers, cfg.num_moe_experts, cfg.hidden_size) == (62, 128, 4096)
    assert args.seq_length == 8192 and args.bf16 and args.use_distributed_optimizer
    assert args.overlap_grad_reduce and args.overlap_param_gather
    assert [s.batch_tokens for s in args.batch_stages] == [64 << 20, 96 << 20, 128 << 20]
    assert [s.start_tokens for s in args.batch_stages] == [0, 6 * 10**12, 83 * 10**11]
    assert args.lr_decay_style == "WSD"
    if phase == "main":
        assert (args.lr, args.min_lr, args.lr_warmup_iters) == (3e-4, 3e-5, 4000)
    else:
        assert (args.lr, args.min_lr, args.lr_warmup_iters) == (3e-5, 1e-5, 0)
    assert args.data_parallel_size == world_size(name) // (int(tp) * 2)


def test_dots_llm1_iteration_counts_match_the_token_budget(paths):
    """main ends at 11T tokens (10T stable + 1T anneal), anneal2 adds 200B; the anneals start
    at 10T and 11T tokens."""
    from megatron_dots.training.batch_stages import total_samples

    name = "dots_llm1.sbatch"
    for phase, end, anneal_start in (("main", 11 * 10**12, 10 * 10**12),
                                     ("anneal2", 112 * 10**11, 11 * 10**12)):
        args = validated(printed_args(name, {**paths, "PHASE": phase}), world_size(name))

        def tokens(iters):
            return total_samples(args.batch_stages, args.seq_length, iters) * args.seq_length

        assert tokens(args.train_iters - 1) < end <= tokens(args.train_iters)
        start = args.train_iters - args.lr_wsd_decay_iters
        assert tokens(start - 1) < anneal_start <= tokens(start)


@pytest.mark.parametrize("with_data", [True, False])
def test_dots_mini_layout_validates(paths, with_data):
    name = "dots_mini_1node.sbatch"
    env = paths if with_data else {"CKPT": paths["CKPT"]}
    args = validated(printed_args(name, env), world_size(name))
    assert args.dots_config.num_layers == 12
    assert (args.expert_model_parallel_size, args.data_parallel_size) == (8, 8)
    assert args.mock_data is not with_data


@pytest.mark.parametrize("name", TRAINING)
def test_a2a_overlap_opt_in_validates(paths, name):
    """DOTS_A2A_OVERLAP=1: the overlap schedule with delayed wgrad (and, with PP 2, one layer
    per virtual stage), on a layout megatron-dots accepts, and more than one CUDA connection."""
    argv = printed_args(name, {**paths, "DOTS_A2A_OVERLAP": "1"})
    args = validated(argv, world_size(name))
    assert args.dots_a2a_overlap and args.delay_wgrad_compute
    if args.pipeline_model_parallel_size > 1:
        assert args.virtual_pipeline_model_parallel_size == 31
    assert not printed_args(name, paths).count("--dots-a2a-overlap")
    with open(script(name)) as handle:
        text = handle.read()
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=$CONNECTIONS" in text
    assert re.search(r'DOTS_A2A_OVERLAP:-0}" == 1 ]]; then\n(?:.*\n){1,2}\s*CONNECTIONS=32', text)


def test_an_invalid_layout_fails_validation(paths):
    """The check above catches a broken script: EP 7 (divides neither the 128 experts nor
    DP), EP 32 (TP 8 x EP 32 x PP 2 = 512 GPUs for an expert grid on 256), PP 4 (62
    layers do not split into 4 stages)."""
    name = "dots_llm1.sbatch"
    argv = printed_args(name, paths)

    def replaced(flag, value):
        out = list(argv)
        out[out.index(flag) + 1] = value
        return out

    for flag, value, message in (
        ("--expert-model-parallel-size", "7", "--expert-model-parallel-size 7"),
        ("--expert-model-parallel-size", "32", "32 must divide the data parallel size 16"),
        ("--pipeline-model-parallel-size", "4", "does not divide num_layers"),
    ):
        with pytest.raises(arguments.ArgumentError, match=message):
            validated(replaced(flag, value), world_size(name))


def test_dots_llm1_requires_its_paths():
    result = subprocess.run(["bash", script("dots_llm1.sbatch")],
                            env={"PATH": os.environ["PATH"], "DOTS_SBATCH_PRINT_ARGS": "1"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "DATA" in result.stderr


def test_preprocess_flags_parse(tmp_path):
    from megatron_dots.data.preprocess import build_parser

    env = {"INPUT": f"{tmp_path}/a.jsonl {tmp_path}/b.jsonl.gz", "TOKENIZER": str(tmp_path),
           "OUTPUT_PREFIX": f"{tmp_path}/out/corpus", "SLURM_CPUS_PER_TASK": "64"}
    args = build_parser().parse_args(printed_args("preprocess.sbatch", env))
    assert args.input == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl.gz"]
    assert args.workers == 64 and args.json_keys == ["text"]


def test_dots_llm1_sft_validates_with_sfts_own_checks(paths, tmp_path):
    """Stage 4: `megatron-dots sft`'s parse + validation at the script's world size; the first
    job starts from BASE_CKPT, requeues resume from CKPT."""
    from megatron_dots.sft.arguments import parse_sft_args

    name = "dots_llm1_sft.sbatch"
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "ckpt-long").mkdir()
    env = {"BASE_CKPT": str(tmp_path / "ckpt-long"), "CHAT": str(chat),
           "TOKENIZER": paths["TOKENIZER"], "CKPT": paths["CKPT"]}
    argv = printed_args(name, env)
    args = parse_sft_args(argv, world_size(name))
    assert args.dots_config.num_layers == 62 and args.bf16 and args.use_distributed_optimizer
    assert args.pretrained_checkpoint == env["BASE_CKPT"]
    assert args.save == args.load == paths["CKPT"] and args.exit_signal_handler
    assert args.data_parallel_size == world_size(name) // 16
    assert args.global_batch_size % args.data_parallel_size == 0
    assert sbatch_option(name, "signal").startswith("SIGTERM@")


def test_utk_flags_parse(tmp_path):
    from megatron_dots.utk.cli import build_parser

    env = {"INPUT_PREFIX": f"{tmp_path}/corpus_text_document", "TOKENIZER": str(tmp_path),
           "OUTPUT_PREFIX": f"{tmp_path}/out/utk", "SLURM_CPUS_PER_TASK": "32"}
    args = build_parser().parse_args(printed_args("utk.sbatch", env))
    assert (args.seq_length, args.workers, args.knot_fraction) == (32768, 32, 0.8)
    assert args.tokenizer == str(tmp_path) and args.output_prefix == f"{tmp_path}/out/utk"


@pytest.mark.parametrize("tp", ["8", "4"])
def test_dots_llm1_long_context_stage_validates(paths, tmp_path, tp):
    """PHASE=long: a new data stage at 32K from CKPT into LONG_CKPT, 128Mi tokens per step,
    LONG_TOKENS of them after anneal2's last iteration, the recompute planner on, no overlap."""
    name = "dots_llm1.sbatch"
    (tmp_path / "long").mkdir()
    env = {**paths, "PHASE": "long", "LONG_CKPT": str(tmp_path / "long"), "DOTS_TP": tp}
    args = validated(printed_args(name, env), world_size(name))
    assert args.seq_length == 32768 == args.dots_config.max_position_embeddings
    assert args.dots_config.rotary_base == 1e7
    assert args.dots_new_data_stage and args.pretrained_checkpoint == paths["CKPT"]
    assert args.save == args.load == str(tmp_path / "long")
    assert args.global_batch_size * args.seq_length == 128 << 20 and not args.dots_batch_stages
    assert (args.lr, args.min_lr, args.lr_decay_style) == (1e-5, 1e-5, "constant")
    assert args.dots_recompute_budget_gb == 70
    steps = args.train_iters - 133863
    assert (steps - 1) * (128 << 20) < 20 * 10**9 <= steps * (128 << 20)
    result = subprocess.run(["bash", script(name)], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "DOTS_SBATCH_PRINT_ARGS": "1",
                                 **env, "DOTS_A2A_OVERLAP": "1"})
    assert result.returncode == 2 and "does not fit at 32K" in result.stderr
    env.pop("LONG_CKPT")
    result = subprocess.run(["bash", script(name)], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "DOTS_SBATCH_PRINT_ARGS": "1", **env})
    assert result.returncode != 0 and "LONG_CKPT" in result.stderr
