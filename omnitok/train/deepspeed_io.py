"""DeepSpeed checkpoints read weights-only, and the run's weights gathered into plain fp32 tensors.

DeepSpeed's own checkpoint engine and ``zero_to_fp32`` unpickle without the weights-only restriction, so a run
directory someone shares could run code on ``--resume`` or export. omnitok therefore
- gives each engine a checkpoint engine whose ``load`` is ``torch.load(weights_only=True)`` with exactly the
  DeepSpeed classes a checkpoint holds allowed (``allowed_classes``: listed from checkpoints of ZeRO 0-3 in fp32 and
  bf16 with ``torch.serialization.get_unsafe_globals_in_checkpoint``; fp16 adds the dynamic loss scaler);
- writes the full fp32 weights (the optimizer's master copy where there is one) as ``model.safetensors`` into every
  checkpoint, which ``omnitok export`` reads instead of DeepSpeed's optimizer files.
"""

from __future__ import annotations

from typing import Any

import torch

from omnitok.weights import load_torch_file


def allowed_classes() -> list[Any]:
    """The classes a DeepSpeed checkpoint legitimately pickles beyond tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def read_weights_only(engine) -> None:
    """Make every checkpoint load of ``engine`` weights-only (model states, ZeRO optimizer partitions)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_torch_file(path, allowed_classes())

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def full_fp32_state(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Every entry of the module's state dict as a full fp32 CPU tensor, on rank 0 (None elsewhere). Parameters
    come from the optimizer's fp32 master copy where it keeps one (bf16 / ZeRO), gathered across ranks; every rank
    must call this (it is collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero_stage == 3):
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    for name, param in module.named_parameters(remove_duplicate=False):
        master = safe_get_full_fp32_param(param)  # collective under ZeRO; None without a master copy
        if master is not None and state is not None and name in state:
            state[name] = master.detach().float().cpu().clone().reshape(state[name].shape)
    return state
