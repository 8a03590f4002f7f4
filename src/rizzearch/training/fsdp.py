"""FSDP2 for the training loop: shard parameters, gradients and optimizer state per block.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` (Zhao et al. 2023, "PyTorch FSDP";
the per-parameter DTensor version) to every block of ``model.blocks`` and then to the model, so
each block's weights are gathered just before it runs and freed after it; tied weights (the
embedding and the LM head) live in the root group. Gradients are averaged over ranks as DDP does,
so the loss curve and the weights equal a 1-process run on the same global batch up to the order
of fp32 reductions.

Checkpoints stay interchangeable with the 1-process loop's: ``full_model_state`` gathers the full
(unsharded) weights on every rank, ``full_optimizer_state`` gathers the optimizer state and writes it
in ``optimizer.state_dict()``'s own layout (parameters numbered in group order, which FSDP keeps),
and ``load_optimizer_state`` does the reverse, so a checkpoint written with FSDP resumes in one
process and a 1-process checkpoint resumes under FSDP.
"""

from __future__ import annotations

import torch
from torch import nn

from rizzearch.errors import ConfigError


def check_fsdp(enabled_distributed: bool) -> None:
    if not enabled_distributed:
        raise ConfigError(
            "train.distributed fsdp needs torchrun (no RANK/WORLD_SIZE in the environment); run e.g. "
            "`torchrun --nproc_per_node 2 -m rizzearch.cli train ... --train.distributed fsdp`, or use ddp"
        )


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every block, then the model (in place); returns the model."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"train.distributed fsdp: {type(model).__name__} has no 'blocks' ModuleList to shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _options(gather: bool = True):
    """Full (unsharded) state dicts; gathered ones land on rank 0 only, in CPU memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on rank 0 ({} on the others; a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def _fqn_order(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state in ``optimizer.state_dict()``'s layout on rank 0 ({} on the others; a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    if not osd:
        return {}
    order = [n for group in _fqn_order(optimizer, model) for n in group]
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: v for n, v in osd["state"].items()}
    groups, k = [], 0
    for g in osd["param_groups"]:
        groups.append({**{key: v for key, v in g.items() if key != "params"}, "params": list(range(k, k + len(g["params"])))})
        k += len(g["params"])
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a full state in ``optimizer.state_dict()``'s layout (every rank passes it) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    order = [n for group in _fqn_order(optimizer, model) for n in group]
    state = {order[int(i)]: v for i, v in saved["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[int(i)] for i in g["params"]]}
              for g in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options(gather=False))


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP's ``no_sync``: skip the gradient reduce-scatter on all but the last micro-batch."""
    model.set_requires_gradient_sync(sync)
