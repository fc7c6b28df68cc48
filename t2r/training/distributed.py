"""Processes of one training run: accelerate's Accelerator for one process, DDP or FSDP2 (also on
the CPU, where accelerate 1.15 would run an FSDP launch as DDP), and the optimizer state of sharded
parameters gathered whole for a checkpoint and split again on resume, so that a checkpoint has the
same format whether a run was sharded or not."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from t2r.errors import UsageError
from t2r.modeling.model import T2RForCausalLM
from t2r.training.lora import add_lora


def make_accelerator() -> Any:
    """This process's accelerate.Accelerator: one process, DDP, or FSDP2 (on the CPU too)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # set by a DeepSpeed launch
        # Under ZeRO-3 a parameter outside the engine's forward is an empty placeholder: checkpoints
        # and the final model would be written from those. Not built (no GPU or deepspeed to test on).
        raise UsageError("t2r does not train under DeepSpeed: shard with configs/accelerate/fsdp.yaml (FSDP2)")
    plugin = None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # set by an FSDP launch
        plugin = FullyShardedDataParallelPlugin()  # the launch's FSDP settings, read from its environment
        if plugin.fsdp_version != 2:
            raise UsageError("t2r trains under FSDP2 only: set fsdp_version: 2 in the accelerate config")
    # On a machine without an accelerator, cpu=True is what lets several processes (torchrun's
    # environment, e.g. `accelerate launch --multi_gpu`) form a gloo group instead of running alone.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    state = accelerator.state
    if plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
        # accelerate (1.15) chooses FSDP on accelerators only and would run this launch as DDP;
        # PyTorch's FSDP2 shards over gloo on the CPU as well, so the launch gets what it asked for.
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return accelerator


class WholeOptimizer:
    """What save_checkpoint reads of an optimizer under FSDP: its state_dict() with every sharded
    tensor gathered whole, on the CPU, i.e. an unsharded run's state_dict(). Every process builds
    one (the gathers are collective); those that do not `keep` it drop each tensor once gathered."""

    def __init__(self, optimizer: torch.optim.Optimizer, keep: bool) -> None:
        from torch.distributed.tensor import DTensor

        def whole(value: Any) -> Any:
            if not isinstance(value, DTensor):
                return value
            gathered = value.full_tensor()
            return gathered.cpu() if keep else None

        state = optimizer.state_dict()
        # the entries are the optimizer's own dicts: the gathered tensors go into new ones
        entries = {i: {key: whole(value) for key, value in entry.items()} for i, entry in state["state"].items()}
        self.state = {**state, "state": entries}

    def state_dict(self) -> dict[str, Any]:
        return self.state


def load_sharded_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded optimizer state_dict into an optimizer of FSDP-sharded parameters: each
    tensor the shape of its parameter becomes a shard like the parameter's (every process calls this)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not isinstance(parameter, DTensor):
                continue
            entry = optimizer.state[parameter]
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == parameter.shape:
                    entry[key] = distribute_tensor(value, parameter.device_mesh, parameter.placements)


@contextlib.contextmanager
def gathered(objective: nn.Module | None) -> Iterator[None]:
    """Inside, every FSDP unit of `objective` holds whole parameters (every process all-gathers its
    shards; a forward of a sharded submodule gathers again); None: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in objective.modules() if isinstance(m, FSDPModule)] if objective is not None else []
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def gathered_student(
    objective: nn.Module, student: T2RForCausalLM, lora_rank: int, main: bool
) -> T2RForCausalLM | None:
    """The sharded student's weights in a fresh model of the same shape, on the main process (None
    elsewhere; every process takes part in the gather): a sharded module's state_dict is shards."""
    from t2r.modeling.convert import convert
    from t2r.modeling.saved import empty_model

    whole = None
    with gathered(objective):
        if main:
            whole = convert(empty_model(student.base.config), student.config)
            if lora_rank:
                add_lora(whole, lora_rank)
            tensors = dict(student.named_parameters(remove_duplicate=False))
            tensors |= dict(student.named_buffers(remove_duplicate=False))
            whole.load_state_dict({name: tensors[name] for name in whole.state_dict()}, strict=True)
    return whole
