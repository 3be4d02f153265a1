"""Sharded data parallelism: ZeRO stage 1 and FSDP2 against DDP, on the same batches, bytes counted per rank.

Explained in notebooks/11_model_parallelism.ipynb, part 3 (Rajbhandari et al. 2020, ZeRO, Sec. 5; the
formula in fp32 here, the mixed-precision one in course_lib.distributed.ddp.memory_per_gpu).

Plain DDP keeps on every one of its N ranks the weights, the gradients and Adam's two moments: in fp32
4 + 4 + 8 = 16 bytes per parameter. ZeRO removes the copies:

* stage 1 (``torch.distributed.optim.ZeroRedundancyOptimizer``): each rank keeps Adam's moments only for
  its 1/N of the parameters, updates those, and broadcasts them: 4Ψ + 4Ψ + 8Ψ/N bytes;
* stage 3 (``torch.distributed.fsdp.fully_shard``, "FSDP2"): weights, gradients and moments are all
  split in N; each layer's weights are all-gathered just before it runs and freed after, its gradients
  reduce-scattered: 16Ψ/N bytes, plus one layer's full weights while it runs.

All three take the same step: the gradients are averaged over the ranks either way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from course_lib.distributed.ddp import (DDPSpec, global_batches, loop_config, make_model, make_optimizer,
                                        max_abs_difference, train_single)
from course_lib.parts.lm import lm_loss
from course_lib.parts.loop import train

__all__ = ["FP32_ADAM_BYTES", "zero_bytes", "state_bytes", "Spec", "worker"]

# fp32 training with Adam: weights, gradients, and the two moments exp_avg and exp_avg_sq
FP32_ADAM_BYTES = {"params": 4, "grads": 4, "optimizer": 8}


def zero_bytes(n_params: float, world: int, stage: int, bytes_per_param: dict[str, float] | None = None
               ) -> dict[str, float]:
    """Bytes per rank of params, grads and optimizer state under ZeRO ``stage`` (0 = DDP) over ``world`` ranks.

    ``bytes_per_param`` defaults to fp32 Adam (4, 4, 8); ``{"params": 2, "grads": 2, "optimizer": 12}`` is
    the mixed-precision count of the ZeRO paper (Sec. 3.1).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0 (DDP), 1, 2 or 3, got {stage!r}.")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer (the number of ranks), got {world!r}.")
    per = dict(bytes_per_param or FP32_ADAM_BYTES)
    sharded = {"optimizer": stage >= 1, "grads": stage >= 2, "params": stage >= 3}
    out = {part: n_params * per[part] / (world if sharded[part] else 1) for part in ("params", "grads", "optimizer")}
    out["total"] = sum(out.values())
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def state_bytes(model: torch.nn.Module, optimizer_state: dict[Any, dict[str, Any]]) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (each tensor once, own shard only)."""
    params = list(model.parameters())  # a tied matrix appears once
    nbytes = lambda t: _local(t).numel() * _local(t).element_size()  # noqa: E731
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": sum(nbytes(v) for s in optimizer_state.values() for k, v in s.items()
                            if isinstance(v, torch.Tensor) and k != "step")}
    out["total"] = sum(out.values())
    return out


@dataclass
class Spec(DDPSpec):
    """The run of course_lib.distributed.ddp (the tiny GPT, no biases, no dropout), trained three ways."""


def _wrap(kind: str, spec: Spec, world: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(spec).to(device)
    ids = [device.index] if device.type == "cuda" else None
    if kind == "ddp":
        wrapped = DDP(model, device_ids=ids, gradient_as_bucket_view=True)  # grads live in DDP's buckets
        return model, wrapped, make_optimizer(wrapped, spec)
    if kind == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        optimizer = ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=torch.optim.AdamW, lr=spec.lr,
                                            weight_decay=0.1, foreach=False)
        return model, wrapped, optimizer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)   # one all-gather per block, freed after the block has run
    fully_shard(model, mesh=mesh)       # the rest: embeddings (tied with the head), final LayerNorm
    return model, model, make_optimizer(model, spec)


def _train(kind: str, spec: Spec, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Train one way (ddp, zero1 or fsdp) with the course's loop; this rank's share of every batch."""
    from torch.distributed.tensor.debug import CommDebugMode

    from course_lib.distributed.tensor_parallel import comm_counts

    model, wrapped, optimizer = _wrap(kind, spec, world, device)
    rows = slice(rank * spec.batch_per_rank, (rank + 1) * spec.batch_per_rank)
    batches = ((x[rows].to(device), y[rows].to(device)) for x, y in global_batches(spec, world))
    modes: list[CommDebugMode] = []   # one per step: the collectives each step makes

    def count_collectives() -> CommDebugMode:
        modes.append(CommDebugMode())
        return modes[-1]

    measured: dict[str, int] = {}

    def measure_bytes(step: int) -> None:   # after the update, while the gradients still exist
        state = optimizer.optim.state if kind == "zero1" else optimizer.state
        measured.update(state_bytes(model, state))

    history = train(wrapped, batches, lm_loss, loop_config(spec, time_steps=True), optimizer=optimizer,
                    device=device, step_context=count_collectives, on_step=measure_bytes)
    comms = comm_counts(modes[-1])
    losses = torch.tensor(history.losses, device=device)
    dist.all_reduce(losses)
    weights = {n: p.full_tensor().detach().cpu() if hasattr(p, "full_tensor") else p.detach().cpu()
               for n, p in model.named_parameters()}
    return dict(bytes=measured, losses=[loss / world for loss in losses.tolist()],
                step_seconds=statistics.median(history.step_seconds), comms_per_step=comms, weights=weights)


def worker(spec: Spec, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    runs = {kind: _train(kind, spec, rank, world, device) for kind in ("ddp", "zero1", "fsdp")}
    n_params = sum(p.numel() for p in make_model(spec).parameters())
    single, single_losses = train_single(spec, world_size=world)
    weights = {kind: run.pop("weights") for kind, run in runs.items()}
    for kind, run in runs.items():
        run["max_abs_diff_vs_ddp"] = max_abs_difference(weights[kind], weights["ddp"])
        run["max_abs_diff_vs_one_process"] = max_abs_difference(weights[kind], single)
    result: dict[str, Any] = dict(n_params=n_params, single_process_losses=single_losses, **runs)
    result["formula_bytes"] = {kind: zero_bytes(n_params, world, stage)
                               for kind, stage in (("ddp", 0), ("zero1", 1), ("fsdp", 3))}
    return result
