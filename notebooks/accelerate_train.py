"""Train the course's GPT with Hugging Face ``accelerate`` on several processes (notebooks/10_scaling_out.ipynb).

The same file runs on one CPU, on two CPU processes (gloo) and on a node of GPUs (nccl, bf16):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no notebooks/accelerate_train.py --out runs/accelerate
    # on a GPU node, e.g. 8 GPUs in bf16:
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 notebooks/accelerate_train.py --out runs/acc

``accelerate launch --multi_gpu`` starts the processes with torchrun; ``Accelerator(cpu=True)`` on a
machine without CUDA makes them a gloo group of CPU processes (``accelerate launch --cpu`` alone would
start just one process unless MPI is installed). ``accelerator.prepare`` wraps the model in
DistributedDataParallel and ``accelerator.backward`` does the all-reduce -- the same update as
``course_lib.distributed.ddp`` and as one process with the whole batch (tests/test_ddp.py compares the weights).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from course_lib.distributed.ddp import DDPSpec, global_batches, make_model, make_optimizer, weights_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for weights.safetensors and losses.json")
    for f in fields(DDPSpec):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    spec = DDPSpec(**{f.name: getattr(args, f.name) for f in fields(DDPSpec)})

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = make_model(spec)
    optimizer = make_optimizer(model, spec)
    model, optimizer = accelerator.prepare(model, optimizer)  # DDP wrapper, device placement, autocast

    rank, world = accelerator.process_index, accelerator.num_processes
    losses = []
    for x, y in global_batches(spec, world):
        rows = slice(rank * spec.batch_per_rank, (rank + 1) * spec.batch_per_rank)  # this rank's share
        _, loss = model(x[rows].to(accelerator.device), y[rows].to(accelerator.device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)   # gradients averaged over the processes here
        optimizer.step()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        accelerator.print(f"step {len(losses)}: loss {losses[-1]:.4f} ({world} processes, "
                          f"{accelerator.distributed_type.value})")

    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(weights_of(accelerator.unwrap_model(model)), str(args.out / "weights.safetensors"))
        (args.out / "losses.json").write_text(json.dumps(dict(
            losses=losses, num_processes=world, distributed_type=accelerator.distributed_type.value)))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
