"""Shared fixtures: a one-process gloo world with Megatron-Core's parallel state."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import megatron_dots  # noqa: E402,F401  (applies compat patches before megatron is used)


@pytest.fixture(scope="session")
def single_process_world():
    """torch.distributed (gloo, world size 1) and Megatron-Core parallel state TP=PP=EP=1."""
    from megatron.core import parallel_state

    from megatron_dots.compat.distributed import init_distributed

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture
def seeded(single_process_world):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_hf_model_and_cfg():
    from reference import make_hf_model, tiny_config

    cfg = tiny_config()
    return make_hf_model(cfg, seed=0, bias_scale=0.3), cfg


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Two synthetic indexed datasets (a blend) for `megatron-dots pretrain` runs."""
    from pretrain_runs import VOCAB
    from training_data import write_progressions

    root = tmp_path_factory.mktemp("data")
    return [write_progressions(str(root / "a"), VOCAB, seed=1),
            write_progressions(str(root / "b"), VOCAB, seed=2)]


@pytest.fixture(scope="session")
def converted_start(tmp_path_factory):
    """A release checkpoint converted from a random HF dots-tiny: every layout starts here."""
    from reference import make_hf_model, tiny_config

    from megatron_dots.convert.hf_to_mcore import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("start")
    make_hf_model(tiny_config(), seed=5, bias_scale=0.05).save_pretrained(root / "hf")
    return convert_hf_to_mcore(str(root / "hf"), str(root / "mcore"), progress=False)
