"""Tensor parallelism (Megatron-LM): one transformer block split over W ranks, each holding 1/W of its matrices.

Explained in notebooks/11_model_parallelism.ipynb, part 1 (Shoeybi et al. 2019, Sec. 3 and Fig. 3).

MLP, Z = GeLU(X A) B. Split A by columns, A = [A_1 … A_W]: rank r computes Y_r = GeLU(X A_r) alone, since
GeLU acts element by element. Split B by rows, B = [B_1; …; B_W]: Z = Σ_r Y_r B_r needs one all-reduce.
``nn.Linear`` stores weight = Aᵀ (out × in), so A's column split is a split of ``mlp.fc.weight``'s rows
(dim 0) and B's row split a split of ``mlp.proj.weight``'s columns (dim 1). fc's bias splits with its
rows; proj's bias is added once, after the sum.

Attention: heads are independent, so rank r keeps heads r·H/W … (r+1)·H/W − 1 -- their rows of W_q, W_k
and W_v -- and W_o's matching columns; one all-reduce after W_o. The course's model keeps W_q, W_k, W_v
stacked in one (3d × d) matrix ``attn.qkv.weight``: cutting its rows into W contiguous pieces would hand
rank 0 all of W_q and half of W_k. :func:`shard_qkv` takes each head's rows out of each of the three.

The paper's two operators, as autograd functions:

    f: identity forward, all-reduce backward   (where the block's input enters the split part)
    g: all-reduce forward, identity backward   (where the partial outputs are summed)

So one block costs 2 all-reduces in the forward pass (g after attention, g after the MLP) and 2 in the
backward pass (the two f's), each of B·T·d numbers. Students write f, g and the split MLP themselves, as a
script run on two processes (exercise 11.1, reference: course_lib/distributed/megatron_mlp.py); the lesson's
block then runs on the f, g and ParallelMLP of that script (:func:`load_operators`, ``Spec.script``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.parts.model import Block, CausalSelfAttention, GPTConfig, MLP
from course_lib.tools.timing import Stopwatch

__all__ = ["Spec", "head_rows", "shard_qkv", "plain_chunk", "f", "g", "TensorParallelAttention",
           "TensorParallelMLP", "TensorParallelBlock", "shard_block", "shard_of", "comm_counts", "worker",
           "mlp_arguments", "mlp_case", "save_shards", "save_results", "load_operators"]


def _check_split(n: int, world: int, what: str) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer (the number of ranks), got {world!r}.")
    if n % world:
        raise ValueError(f"{what} = {n} cannot be split evenly over {world} ranks: choose a number of ranks "
                         f"that divides it.")


def head_rows(d_model: int, n_head: int, rank: int, world: int) -> torch.Tensor:
    """The rows of the fused (3d × d) QKV weight that hold rank ``rank``'s heads: its W_q, W_k, W_v rows."""
    _check_split(n_head, world, "n_head")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in 0..{world - 1}, got {rank!r}.")
    width = d_model // n_head * (n_head // world)            # d_head × heads per rank
    own = torch.arange(rank * width, (rank + 1) * width)
    return torch.cat([own, own + d_model, own + 2 * d_model])  # W_q rows, then W_k rows, then W_v rows


def shard_qkv(t: torch.Tensor, n_head: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of the fused QKV weight (3d × d) or bias (3d,), split by heads."""
    if t.shape[0] % 3:
        raise ValueError(f"a fused QKV tensor has 3·d_model rows, got shape {tuple(t.shape)}.")
    return t[head_rows(t.shape[0] // 3, n_head, rank, world).to(t.device)]


def plain_chunk(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """The W-th part of ``t`` along ``dim``, contiguous: right for fc and proj, wrong for the fused QKV."""
    _check_split(t.shape[dim], world, f"dimension {dim} of a {tuple(t.shape)} tensor")
    return t.chunk(world, dim=dim)[rank]


class _CopyToRanks(torch.autograd.Function):
    """Megatron's f: the input is used by every rank, so its gradient is the sum of theirs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """Megatron's g: sum the ranks' partial outputs; every rank then holds the same output gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def f(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (Shoeybi et al. 2019, Fig. 3)."""
    return _CopyToRanks.apply(x, group)


def g(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward (Shoeybi et al. 2019, Fig. 3)."""
    return _SumOverRanks.apply(x, group)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone())


class TensorParallelAttention(nn.Module):
    """Rank ``rank``'s heads of a :class:`~course_lib.parts.model.CausalSelfAttention`, with the same weights.

    ``split="plain"`` cuts the fused QKV rows into contiguous pieces instead of by heads: it runs, and it
    is wrong (the lesson shows by how much).
    """

    def __init__(self, attn: CausalSelfAttention, rank: int, world: int, group: Any = None,
                 split: str = "heads", operators: ModuleType | None = None) -> None:
        super().__init__()
        if split not in ("heads", "plain"):
            raise ValueError(f"split must be 'heads' or 'plain', got {split!r}.")
        _check_split(attn.n_head, world, "n_head")
        self.group, self.n_local = group, attn.n_head // world
        # Megatron's f and g: the course's, or those of a script written in exercise 11.1 (default group only)
        self.f = operators.CopyToRanks.apply if operators else (lambda x: f(x, group))
        self.g = operators.SumOverRanks.apply if operators else (lambda x: g(x, group))
        self.d_head = attn.d_model // attn.n_head
        cut = (lambda t: shard_qkv(t, attn.n_head, rank, world)) if split == "heads" else \
            (lambda t: plain_chunk(t, rank, world))
        width = self.n_local * self.d_head
        self.qkv = nn.Linear(attn.d_model, 3 * width, bias=attn.qkv.bias is not None)
        self.qkv.weight = _param(cut(attn.qkv.weight))
        if attn.qkv.bias is not None:
            self.qkv.bias = _param(cut(attn.qkv.bias))
        self.proj = nn.Linear(width, attn.d_model, bias=attn.proj.bias is not None)
        self.proj.weight = _param(plain_chunk(attn.proj.weight, rank, world, dim=1))  # W_o's columns
        if attn.proj.bias is not None:
            self.proj.bias = _param(attn.proj.bias)                                  # added once, after g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.f(x)
        q, k, v = self.qkv(x).split(self.n_local * self.d_head, dim=2)
        q, k, v = (t.view(B, T, self.n_local, self.d_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.d_head)
        z = self.g(F.linear(y, self.proj.weight))
        return z + self.proj.bias if self.proj.bias is not None else z


class TensorParallelMLP(nn.Module):
    """Rank ``rank``'s part of a :class:`~course_lib.parts.model.MLP`: fc split by columns of A, proj by rows of B."""

    def __init__(self, mlp: MLP, rank: int, world: int, group: Any = None) -> None:
        super().__init__()
        self.group = group
        d_ff, d = mlp.fc.weight.shape
        _check_split(d_ff, world, "d_ff")
        self.fc = nn.Linear(d, d_ff // world, bias=mlp.fc.bias is not None)
        self.fc.weight = _param(plain_chunk(mlp.fc.weight, rank, world, dim=0))
        if mlp.fc.bias is not None:
            self.fc.bias = _param(plain_chunk(mlp.fc.bias, rank, world, dim=0))
        self.proj = nn.Linear(d_ff // world, d, bias=mlp.proj.bias is not None)
        self.proj.weight = _param(plain_chunk(mlp.proj.weight, rank, world, dim=1))
        if mlp.proj.bias is not None:
            self.proj.bias = _param(mlp.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc(f(x, self.group)))
        z = g(F.linear(y, self.proj.weight), self.group)
        return z + self.proj.bias if self.proj.bias is not None else z


class TensorParallelBlock(nn.Module):
    """A pre-LN block whose attention and MLP are split; LayerNorms and residuals run on every rank."""

    def __init__(self, block: Block, rank: int, world: int, group: Any = None, split: str = "heads",
                 operators: ModuleType | None = None) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2)
        self.attn = TensorParallelAttention(block.attn, rank, world, group, split, operators)
        self.mlp = _student_mlp(operators, block.mlp, rank, world) if operators else \
            TensorParallelMLP(block.mlp, rank, world, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _student_mlp(operators: ModuleType, mlp: MLP, rank: int, world: int) -> nn.Module:
    """A script's ParallelMLP of ``mlp``, its new layers made in ``mlp``'s dtype and moved to its device."""
    weight = mlp.fc.weight
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weight.dtype)
    try:
        return operators.ParallelMLP(mlp, rank, world).to(weight.device)
    finally:
        torch.set_default_dtype(previous)


def shard_block(block: Block, rank: int, world: int, group: Any = None, split: str = "heads",
                operators: ModuleType | None = None) -> TensorParallelBlock:
    """Rank ``rank``'s :class:`TensorParallelBlock` of ``block`` (same weights, 1/W of each matrix); with
    ``operators`` (:func:`load_operators`), its f, g and MLP are those of a script written in exercise 11.1."""
    return TensorParallelBlock(block, rank, world, group, split, operators)


def shard_of(name: str, full: torch.Tensor, n_head: int, rank: int, world: int) -> torch.Tensor:
    """The part of the unsplit block's tensor ``name`` that rank ``rank``'s TensorParallelBlock holds."""
    if name.startswith("attn.qkv."):
        return shard_qkv(full, n_head, rank, world)
    if name in ("attn.proj.weight", "mlp.proj.weight"):
        return plain_chunk(full, rank, world, dim=1)
    if name.startswith("mlp.fc."):
        return plain_chunk(full, rank, world, dim=0)
    return full  # LayerNorms and the biases added after g are replicated


def comm_counts(mode: Any) -> dict[str, int]:
    """``{collective name: count}`` from a finished ``CommDebugMode`` (c10d and functional collectives)."""
    return {getattr(op, "__name__", str(op)).rstrip("_"): n for op, n in mode.get_comm_counts().items()}


# ------------------------------------------------------------------------------------------------
# What every rank runs (python -m course_lib.distributed.parallel tensor)
# ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One block of the course's GPT and one batch; ``repeats`` timed forward+backward passes."""

    d_model: int = 64
    n_head: int = 4
    context: int = 32
    batch: int = 4
    bias: bool = True
    dtype: str = "float32"
    seed: int = 0
    repeats: int = 5
    script: str = ""      # a script of exercise 11.1 whose f, g and ParallelMLP the block uses ("": the course's)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")
        GPTConfig(vocab_size=2, context=self.context, n_head=self.n_head, d_model=self.d_model)  # validates


def _block(spec: Spec, device: torch.device) -> Block:
    config = GPTConfig(vocab_size=2, context=spec.context, n_layer=1, n_head=spec.n_head, d_model=spec.d_model,
                       bias=spec.bias)
    torch.manual_seed(spec.seed)
    block = Block(config)
    with torch.no_grad():  # non-zero biases and LayerNorm weights, so that one added twice would show
        for name, p in block.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return block.to(device=device, dtype=getattr(torch, spec.dtype))


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _fastest(fn: Any, repeats: int, device: torch.device | None = None) -> float:
    """The fastest of ``repeats`` synchronised calls, every rank starting each one together (a barrier)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        with Stopwatch(device) as watch:
            fn()
        times.append(watch.seconds)
    return min(times)


def _dtensor_mlp(block: Block, x: torch.Tensor, world: int, device: torch.device) -> dict[str, Any]:
    """The same MLP split by PyTorch's own DTensor plans (ColwiseParallel, RowwiseParallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(device.type, (world,))
    mlp = parallelize_module(copy.deepcopy(block.mlp), mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
    with CommDebugMode() as mode:
        z = mlp(x)
    return dict(max_abs_diff=(z - block.mlp(x)).abs().max().item(), forward_comms=comm_counts(mode))


def worker(spec: Spec, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    from torch.distributed.tensor.debug import CommDebugMode

    block = _block(spec, device)
    generator = torch.Generator().manual_seed(spec.seed + 1)   # the same batch on every rank
    x = torch.randn(spec.batch, spec.context, spec.d_model, generator=generator).to(block.ln_1.weight)
    dy = torch.randn(x.shape, generator=generator).to(x)

    x_ref = x.clone().requires_grad_()
    y_ref = block(x_ref)
    y_ref.backward(dy)

    tp = shard_block(block, rank, world, operators=load_operators(spec.script) if spec.script else None)
    x_tp = x.clone().requires_grad_()
    with CommDebugMode() as forward_mode:
        y = tp(x_tp)
    with CommDebugMode() as backward_mode:
        y.backward(dy)
    full = dict(block.named_parameters())
    grad_diff = max((p.grad - shard_of(n, full[n].grad, spec.n_head, rank, world)).abs().max().item()
                    for n, p in tp.named_parameters())
    with torch.no_grad():
        plain = shard_block(block, rank, world, split="plain")(x)

    tp_params = sum(p.numel() for p in tp.parameters())
    timing_x = x.clone().requires_grad_()
    activation = torch.zeros_like(x)
    result = dict(
        output_max_abs_diff=_max_over_ranks((y - y_ref).abs().max().item(), device),
        input_grad_max_abs_diff=_max_over_ranks((x_tp.grad - x_ref.grad).abs().max().item(), device),
        param_grad_max_abs_diff=_max_over_ranks(grad_diff, device),
        plain_split_output_max_abs_diff=_max_over_ranks((plain - y_ref).abs().max().item(), device),
        output_scale=y_ref.abs().max().item(), input_grad_scale=x_ref.grad.abs().max().item(),
        param_grad_scale=max(p.grad.abs().max().item() for p in block.parameters()),
        forward_comms=comm_counts(forward_mode), backward_comms=comm_counts(backward_mode),
        params_full=sum(p.numel() for p in block.parameters()), params_this_rank=tp_params,
        dtensor_mlp=_dtensor_mlp(block, x, world, device),
        seconds_full_block=_fastest(lambda: block(timing_x).backward(dy), spec.repeats, device),
        seconds_split_block=_fastest(lambda: tp(timing_x).backward(dy), spec.repeats, device),
        seconds_all_reduce=_fastest(lambda: dist.all_reduce(activation), spec.repeats, device),
        all_reduce_numel=activation.numel(),
    )
    return result


# ------------------------------------------------------------------------------------------------
# Exercise 11.1's script: Megatron's f and g and the split MLP, run on two processes
# ------------------------------------------------------------------------------------------------


def mlp_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """What the script of exercise 11.1 reads from its command line: ``--out`` and the MLP's size."""
    parser = argparse.ArgumentParser(description="Megatron's MLP on several processes (exercise 11.1).")
    parser.add_argument("--out", required=True, type=Path, help="folder for what every rank writes")
    parser.add_argument("--d-model", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def mlp_case(args: argparse.Namespace) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """The course's whole MLP (d → 4d → GeLU → d, with biases), an input x and an output gradient dy, drawn from
    the seed: the same on every rank, and in the check that compares with them."""
    torch.manual_seed(args.seed)
    mlp = MLP(GPTConfig(vocab_size=2, context=args.tokens, n_layer=1, n_head=1, d_model=args.d_model, bias=True))
    x = torch.randn(args.batch, args.tokens, args.d_model)
    return mlp, x, torch.randn(args.batch, args.tokens, args.d_model)


def save_shards(out: str | Path, rank: int, module: nn.Module) -> None:
    """What the rank holds before it runs (``shards_rank{rank}.safetensors``): every parameter by name."""
    from safetensors.torch import save_file

    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in module.named_parameters()},
              str(Path(out) / f"shards_rank{rank}.safetensors"))


def save_results(out: str | Path, rank: int, module: nn.Module, y: torch.Tensor, x_grad: torch.Tensor | None) -> None:
    """The rank's output, the gradient of its input, and its parameters' gradients (``results_rank{rank}``)."""
    from safetensors.torch import save_file

    tensors = {"y": y.detach(), **{f"grad.{n}": p.grad for n, p in module.named_parameters() if p.grad is not None}}
    if x_grad is not None:
        tensors["x_grad"] = x_grad
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(out) / f"results_rank{rank}.safetensors"))


def load_operators(script: str | Path) -> ModuleType:
    """The f (``CopyToRanks``), g (``SumOverRanks``) and ``ParallelMLP`` of a script of exercise 11.1, imported from
    its file (its ``if __name__ == "__main__":`` part does not run)."""
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"no script at {path}: write it first (the %%writefile cell of exercise 11.1).")
    spec = importlib.util.spec_from_file_location(f"megatron_operators_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("CopyToRanks", "SumOverRanks", "ParallelMLP") if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{path.name} defines no {missing[0]}: keep the names of the exercise's template.")
    return module
