"""Loading a checkpoint's optimizer state into a differently built optimizer.

Megatron-Core (0.16-0.20) stores the optimizer entry differently for each optimizer class,
and a `ChainedOptimizer` of two (dense + expert parameters, whenever expert parallelism
is on) nests the entries under 0 and 1:

=====================  ===========================================  =========================
optimizer              common (non-tensor) state                    fp32 main weights
=====================  ===========================================  =========================
plain, fp32 params     ``state.common_step``, ``param_groups``      the model weights
plain, bf16/fp16       ``optimizer.{state.common_step,              ``optimizer.state.
(Float16Optimizer...)  param_groups}``, ``grad_scaler``             fp32_param.KEY``
distributed            ``optimizer.param_groups[*].step``,          ``optimizer.state.
(fully reshardable)    ``param_state_sharding_type``, grad_scaler   param.KEY``
=====================  ===========================================  =========================

The Adam moments are model-space tensors under the same keys in all three
(``optimizer.state.exp_avg.KEY``), so they reshard between layouts by themselves. What does
not carry over is the rest: Megatron-Core's loaders expect their own common layout and the
parameter groups of their own chain. When the checkpoint's optimizer layout differs from the
run's (distributed <-> plain, expert parallelism switched on or off), `OptimizerLoadPlan`
asks for the tensors under the checkpoint's names and builds the run's own state dict around
them: the run's parameter groups (their hyperparameters come from the flags and the restored
LR schedule anyway), the checkpoint's Adam step and fp16 loss scaler.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

PLAIN_FP32 = "plain optimizer, fp32 parameters"
PLAIN_MIXED = "plain optimizer, bf16/fp16 parameters"
DISTRIBUTED = "distributed optimizer"

# Where each kind keeps its fp32 main weights (None: the model's own weights are fp32).
_MAIN_WEIGHTS = {PLAIN_FP32: None, PLAIN_MIXED: "optimizer.state.fp32_param.",
                 DISTRIBUTED: "optimizer.state.param."}


def _entries(entry) -> Tuple:
    """The per-optimizer entries of a (possibly chained) optimizer state dict."""
    if isinstance(entry, dict) and entry and all(isinstance(k, int) for k in entry):
        return tuple(entry[k] for k in sorted(entry))
    return (entry,)


def saved_layout(entry) -> Tuple[str, int]:
    """(kind, number of chained optimizers) of a checkpoint's common optimizer entry."""
    entries = _entries(entry)
    first = entries[0] or {}
    if "param_state_sharding_type" in first:
        kind = DISTRIBUTED
    elif "optimizer" in first:
        kind = PLAIN_MIXED
    else:
        kind = PLAIN_FP32
    return kind, len(entries)


def runtime_layout(optimizer) -> Tuple[str, int]:
    """(kind, number of chained optimizers) of a Megatron-Core optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    first = chain[0]
    if isinstance(first, DistributedOptimizer):
        kind = DISTRIBUTED
    elif isinstance(first, Float16OptimizerWithFloat16Params):
        kind = PLAIN_MIXED
    else:
        kind = PLAIN_FP32
    return kind, len(chain)


def saved_step(entry) -> Optional[float]:
    """The Adam step count the checkpoint's optimizer had reached (None if it holds none)."""
    steps = []
    for one in filter(None, _entries(entry)):
        groups = one.get("optimizer", {}).get("param_groups", []) if "optimizer" in one else []
        steps += [g["step"] for g in groups if g.get("step") is not None]
        common = one.get("optimizer", one).get("state", {}).get("common_step")
        if common is not None:
            steps.append(common)
    steps = [float(s.item() if torch.is_tensor(s) else s) for s in steps]
    return max(steps) if steps else None


def saved_grad_scaler(entry) -> Optional[Dict[str, Any]]:
    """The fp16 loss scaler's state the checkpoint holds (None without one)."""
    for one in filter(None, _entries(entry)):
        if one.get("grad_scaler") is not None:
            return one["grad_scaler"]
    return None


@dataclasses.dataclass(frozen=True)
class _ModelWeights:
    """Stands for the model's own (fp32) weights under `key` (plain fp32 checkpoints)."""

    key: str


def _sharded_leaves(tree):
    if isinstance(tree, ShardedBase):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _sharded_leaves(value)


def _retarget(tree, ours: str, saved: str):
    """`tree` with the main-weight tensors asked for under the checkpoint's names."""
    if isinstance(tree, ShardedBase):
        prefix = _MAIN_WEIGHTS[ours]
        if prefix is None or not tree.key.startswith(prefix):
            return tree
        model_key = tree.key[len(prefix):]
        if _MAIN_WEIGHTS[saved] is None:
            return _ModelWeights(model_key)
        return dataclasses.replace(tree, key=_MAIN_WEIGHTS[saved] + model_key)
    if isinstance(tree, dict):
        return {k: _retarget(v, ours, saved) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_retarget(v, ours, saved) for v in tree]
    return tree


class OptimizerLoadPlan:
    """How to ask a checkpoint for this optimizer's state, and how to hand it over.

    `request` goes into `dist_checkpointing.load` under "optimizer"; `finish(loaded)` (after
    the model weights are loaded) returns what `optimizer.load_state_dict` takes.
    """

    def __init__(self, optimizer, model_state: Dict[str, Any], saved_entry, metadata):
        self.template = optimizer.sharded_state_dict(model_state, is_loading=True,
                                                     metadata=metadata)
        self.ours = runtime_layout(optimizer)
        self.saved = saved_layout(saved_entry)
        self.translated = self.ours != self.saved
        if not self.translated:
            self.request = self.template
            return
        self.request = _retarget(self.template, self.ours[0], self.saved[0])
        self._model = {leaf.key: leaf.data for leaf in _sharded_leaves(model_state)}
        self._step = saved_step(saved_entry)
        self._grad_scaler = saved_grad_scaler(saved_entry)

    def describe(self) -> str:
        saved, ours = (f"{kind} x{n}" if n > 1 else kind for kind, n in (self.saved, self.ours))
        return f"optimizer state of a {saved} loaded into a {ours}"

    def finish(self, loaded):
        if not self.translated:
            return loaded
        state = self._fill(self.template, self.request, loaded)
        for entry in _entries(state):
            self._restore_step_and_scaler(entry)
        return state

    def _fill(self, template, request, loaded):
        """The run's own state dict: loaded tensors where it asked for tensors, its own values
        everywhere else."""
        if isinstance(request, _ModelWeights):
            return self._model[request.key]
        if isinstance(request, ShardedBase):
            return loaded
        if isinstance(template, LocalNonpersistentObject):
            return template.unwrap()
        if isinstance(template, dict):
            return {k: self._fill(v, request[k], _child(loaded, k)) for k, v in template.items()}
        if isinstance(template, list):
            return [self._fill(v, request[i], _child(loaded, i)) for i, v in enumerate(template)]
        return template

    def _restore_step_and_scaler(self, entry) -> None:
        kind = self.ours[0]
        if self._step is not None:
            if kind == DISTRIBUTED:
                for group in entry["optimizer"]["param_groups"]:
                    group["step"] = self._step
            else:
                inner = entry["optimizer"] if kind == PLAIN_MIXED else entry
                inner["state"]["common_step"] = torch.tensor(self._step)
        if self._grad_scaler is not None and "grad_scaler" in entry:
            entry["grad_scaler"] = self._grad_scaler


def _child(loaded, key):
    if isinstance(loaded, dict):
        return loaded.get(key)
    if isinstance(loaded, list) and isinstance(key, int) and key < len(loaded):
        return loaded[key]
    return None
