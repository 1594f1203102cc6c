"""Shared fixtures: a one-process gloo world with Megatron-Core's parallel state."""

import os
import socket
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import megatron_dots  # noqa: E402,F401  (applies compat patches before megatron is used)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_world():
    """torch.distributed (gloo, world size 1) and Megatron-Core parallel state TP=PP=EP=1."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
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
