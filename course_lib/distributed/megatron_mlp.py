"""Megatron's f and g and the MLP split over the ranks: the reference solution of exercise 11.1, a script torchrun runs.

Explained in notebooks/11_model_parallelism.ipynb, section 1 (Shoeybi et al. 2019, Sec. 3 and Fig. 3), where
students write this file themselves with ``%%writefile``; below the docstring it is the solution of the
notebook's template, word for word (tests/test_checks_scripts.py keeps the two equal)::

    torchrun --standalone --nproc_per_node=2 course_lib/distributed/megatron_mlp.py --out runs/mlp

The lesson's tensor-parallel block (course_lib.distributed.tensor_parallel) then runs with the f, g and
ParallelMLP of whichever script passed the check: the student's, or this one.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.distributed import launch, tensor_parallel


class CopyToRanks(torch.autograd.Function):
    """Megatron's f, where the MLP's input enters the split part."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)             # every rank used x: its gradient is the sum of the ranks' parts
        return grad


class SumOverRanks(torch.autograd.Function):
    """Megatron's g, where the ranks' partial outputs are summed."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad                       # every rank already holds the whole output gradient


class ParallelMLP(nn.Module):
    """Rank `rank`'s part of the course's MLP (fc: d -> 4d, GeLU, proj: 4d -> d), as nn.Linear layers fc and proj."""

    def __init__(self, mlp, rank, world):
        super().__init__()
        d_ff, d = mlp.fc.weight.shape
        mine = slice(rank * d_ff // world, (rank + 1) * d_ff // world)   # this rank's columns of A = rows of fc.weight
        self.fc = nn.Linear(d, d_ff // world)
        self.proj = nn.Linear(d_ff // world, d)
        with torch.no_grad():
            self.fc.weight.copy_(mlp.fc.weight[mine])
            self.fc.bias.copy_(mlp.fc.bias[mine])
            self.proj.weight.copy_(mlp.proj.weight[:, mine])          # its rows of B = columns of proj.weight
            self.proj.bias.copy_(mlp.proj.bias)                        # whole: added once, after the sum

    def forward(self, x):
        h = F.gelu(self.fc(CopyToRanks.apply(x)))
        return SumOverRanks.apply(F.linear(h, self.proj.weight)) + self.proj.bias


if __name__ == "__main__":
    args = tensor_parallel.mlp_arguments()          # --out and the MLP's size
    rank, world, device = launch.init(group_timeout_s=30)
    mlp, x, dy = tensor_parallel.mlp_case(args)     # the whole MLP, an input and an output gradient: equal on every rank
    part = ParallelMLP(mlp, rank, world)
    tensor_parallel.save_shards(args.out, rank, part)
    x.requires_grad_()
    y = part(x)
    y.backward(dy)
    tensor_parallel.save_results(args.out, rank, part, y, x.grad)
    launch.finish()
