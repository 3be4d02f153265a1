"""Data parallelism with ``torch.distributed``: DDP, the cost of an all-reduce, memory per GPU.

Explained in notebooks/10_scaling_out.ipynb.

Data parallelism keeps a full copy of the model on every process (a *rank*). Each rank takes its own
slice of the global batch, computes gradients on it, and an **all-reduce** averages the gradients over
the ranks before the optimiser step. With ``W`` ranks of ``b`` examples each, the averaged gradient is

    (1/W) * sum_r grad L_r  =  grad (1/W) * sum_r L_r  =  grad L_global(W*b),

the gradient of one process with batch ``W*b`` -- so every replica takes the *same* step as that one
process would. Students write that by hand in exercise 10.2 (shard, broadcast, average; the reference script
is course_lib/distributed/data_parallel.py, its plumbing :func:`script_arguments` and :func:`save_run` here).
``python -m course_lib.distributed.ddp`` shows it for real: launched by ``torchrun`` it runs such a script
first (``--script``), then trains the course's GPT under ``DistributedDataParallel`` and writes the final
weights with safetensors; :func:`train_single` trains the same model on the whole batch in one process, for
comparison.

The backend follows the device: ``nccl`` when every rank gets its own CUDA GPU, ``gloo`` on CPUs
(so the same script runs on a laptop, in CI and on a GPU node)::

    torchrun --standalone --nproc_per_node=2 -m course_lib.distributed.ddp --out runs/ddp

:func:`memory_per_gpu` is the memory arithmetic of Rajbhandari et al. 2020 (ZeRO, Sec. 3.1 and Fig. 1):
mixed-precision Adam keeps 16 bytes per parameter (2 bf16 weights + 2 bf16 gradients + 12 for the fp32
master copy and the two moments), and ZeRO stages 1/2/3 shard the optimiser states / + gradients /
+ weights over the data-parallel ranks.
"""

from __future__ import annotations

import time

_FIRST_LINE = time.time()  # when this module started running, before torch: see launch_phases()

import argparse  # noqa: E402 (after the time stamp above, on purpose)
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from course_lib.parts.lm import lm_loss  # noqa: E402
from course_lib.parts.loop import LoopConfig, train  # noqa: E402
from course_lib.distributed.launch import init, run_script_here, run_torchrun, stamp  # noqa: E402
from course_lib.tools.timing import fastest, sync  # noqa: E402

_TORCH_IMPORTED = time.time()

__all__ = [
    "DDPSpec", "make_model", "make_optimizer", "weights_of", "global_batches", "train_single", "loop_config",
    "spec_arguments", "script_arguments", "save_run", "launch", "load_weights",
    "max_abs_difference", "ring_all_reduce", "time_all_reduce", "memory_per_gpu", "gpus_needed", "BYTES_PER_PARAM",
]

# ------------------------------------------------------------------------------------------------
# What is trained: the same tiny GPT and the same batches in every process
# ------------------------------------------------------------------------------------------------


@dataclass
class DDPSpec:
    """The run: model size, batch per rank, steps. Identical in every rank and in the reference."""

    steps: int = 3
    batch_per_rank: int = 4
    context: int = 32
    vocab_size: int = 64
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    lr: float = 1e-3
    seed: int = 0
    dtype: str = "float32"
    optimizer: str = "adamw"   # "sgd": plain SGD, whose step shows the size of the gradient (exercise 10.2)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if value not in ("float32", "float64"):
                    raise ValueError(f"dtype must be 'float32' or 'float64', got {value!r}.")
            elif f.name == "optimizer":
                if value not in ("adamw", "sgd"):
                    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {value!r}.")
            elif f.name == "lr":
                if not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"lr must be a positive number, got {value!r}.")
            elif f.name != "seed" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                             f"choose d_model as a multiple of n_head.")


def make_model(spec: DDPSpec, *, seed: int | None = None) -> torch.nn.Module:
    """The course's GPT (course_lib.parts.model) at the size of ``spec``, without dropout, its initial weights
    drawn with ``seed`` (default: the spec's seed, as in the one-process reference)."""
    from course_lib.parts.model import GPT, GPTConfig

    torch.manual_seed(spec.seed if seed is None else seed)
    config = GPTConfig(vocab_size=spec.vocab_size, context=spec.context, d_model=spec.d_model,
                       n_layer=spec.n_layer, n_head=spec.n_head, dropout=0.0, bias=False)
    return GPT(config).to(getattr(torch, spec.dtype))


def global_batches(spec: DDPSpec, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (inputs, targets) pair per step, each with ``world_size * batch_per_rank`` rows.

    The tokens follow a simple rule with noise (next = previous + 1 mod vocab, one in four replaced at
    random), so that the loss actually falls; generated from the seed, so every rank builds the same list.
    """
    generator = torch.Generator().manual_seed(spec.seed + 1)
    rows = world_size * spec.batch_per_rank
    batches = []
    for _ in range(spec.steps):
        start = torch.randint(spec.vocab_size, (rows, 1), generator=generator)
        tokens = (start + torch.arange(spec.context + 1)) % spec.vocab_size
        noise = torch.randint(spec.vocab_size, tokens.shape, generator=generator)
        tokens = torch.where(torch.rand(tokens.shape, generator=generator) < 0.25, noise, tokens)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def loop_config(spec: DDPSpec, *, time_steps: bool = False) -> LoopConfig:
    """The course's loop with the spec's constant learning rate, no clipping, no progress bar."""
    return LoopConfig(steps=spec.steps, lr=spec.lr, schedule="constant", grad_clip=None, log_every=spec.steps,
                      time_steps=time_steps, progress=False)


def make_optimizer(model: torch.nn.Module, spec: DDPSpec) -> torch.optim.Optimizer:
    """AdamW with the spec's learning rate (the for-loop implementation: the same on every device), or plain
    SGD (``spec.optimizer == "sgd"``): step = −lr × gradient, so a gradient of the wrong size shows in the
    weights (Adam divides every gradient by its own running size and would hide a constant factor)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, foreach=False)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, foreach=False)


def train_single(spec: DDPSpec, world_size: int = 2, device: str | torch.device = "cpu", *,
                 shuffle_rows: bool = False) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The reference: ONE process, batch ``world_size * batch_per_rank``. Returns (weights, losses).

    ``shuffle_rows=True`` permutes the rows of every batch first: mathematically the same mean loss and
    the same step, but the float sums run in another order -- which shows how large pure rounding
    differences are.
    """
    model = make_model(spec).to(device)
    generator = torch.Generator().manual_seed(spec.seed + 2)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in global_batches(spec, world_size):
            if shuffle_rows:
                order = torch.randperm(x.shape[0], generator=generator)
                x, y = x[order], y[order]
            yield x.to(device), y.to(device)

    history = train(model, batches(), lm_loss, loop_config(spec), optimizer=make_optimizer(model, spec))
    return weights_of(model), history.losses


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter once (a tied matrix under its first name), on the CPU: what safetensors saves."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over all tensors of two state dicts with the same keys and shapes."""
    if set(a) != set(b):
        raise ValueError(f"the two state dicts hold different tensors (only in one of them: "
                         f"{sorted(set(a) ^ set(b))[:5]}): compare weights of the same model.")
    worst = 0.0
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"{key!r} has shape {tuple(a[key].shape)} in one state dict and "
                             f"{tuple(b[key].shape)} in the other.")
        worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------------------
# A data-parallel script's plumbing: its arguments and what it writes (exercise 10.2)
# ------------------------------------------------------------------------------------------------


def spec_arguments(spec: DDPSpec) -> list[str]:
    """The command-line arguments that give a script (or ``-m course_lib.distributed.ddp``) this spec."""
    args: list[str] = []
    for key, value in asdict(spec).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def script_arguments(argv: list[str] | None = None) -> tuple[DDPSpec, Path]:
    """What a data-parallel script reads from its command line: the spec (:func:`spec_arguments`) and ``--out``."""
    parser = argparse.ArgumentParser(description="A data-parallel training script (notebooks/10_scaling_out.ipynb).")
    parser.add_argument("--out", required=True, type=Path, help="folder for what every rank writes")
    for f in fields(DDPSpec):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    return DDPSpec(**{f.name: getattr(args, f.name) for f in fields(DDPSpec)}), args.out


def save_run(out: str | Path, rank: int, *, start: dict[str, torch.Tensor], model: torch.nn.Module,
             batches: list[tuple[torch.Tensor, torch.Tensor]], losses: list[float]) -> None:
    """What each rank of a data-parallel script writes, as safetensors and JSON: its weights when training
    started (``start``) and when it ended, the rows it trained on at every step, and its losses."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().cpu().contiguous() for n, t in start.items()}, str(out / f"start_rank{rank}.safetensors"))
    save_file(weights_of(model), str(out / f"weights_rank{rank}.safetensors"))
    save_file({f"step{i}": x.detach().cpu().contiguous() for i, (x, _) in enumerate(batches)},
              str(out / f"rows_rank{rank}.safetensors"))
    (out / f"losses_rank{rank}.json").write_text(json.dumps([float(v) for v in losses]))


# ------------------------------------------------------------------------------------------------
# The distributed part: runs inside each process started by torchrun
# ------------------------------------------------------------------------------------------------


def ring_all_reduce(grads: list[torch.Tensor], send: Any) -> list[torch.Tensor]:
    """A ring all-reduce on W simulated ranks (exercise 10.1's reference; Patarasuk & Yuan 2009).

    ``grads[r]`` is rank r's tensor; ranks talk only through ``send(src, dst, tensor)``, which returns dst's
    copy. Every tensor is cut into W chunks (``tensor_split``: unequal when W does not divide it). W − 1 steps of
    reduce-scatter, each rank passing one partial sum to rank r + 1, leave rank r with the full sum of one chunk;
    W − 1 steps of all-gather pass the finished chunks around. Each rank sends 2(W − 1) chunks: 2(W − 1)/W · n
    numbers. Returns one new tensor per rank, each the sum; the inputs stay as they were.
    """
    W = len(grads)
    chunks = [list(torch.tensor_split(g.flatten().clone(), W)) for g in grads]   # rank r's copy of every chunk
    for j in range(W - 1):          # reduce-scatter: rank r passes its partial sum of chunk (r - j) to r + 1
        sent = [(r, (r - j) % W, send(r, (r + 1) % W, chunks[r][(r - j) % W])) for r in range(W)]
        for r, c, data in sent:
            chunks[(r + 1) % W][c] = chunks[(r + 1) % W][c] + data
    for j in range(W - 1):          # all-gather: rank r passes the finished chunk (r + 1 - j) to r + 1
        sent = [(r, (r + 1 - j) % W, send(r, (r + 1) % W, chunks[r][(r + 1 - j) % W])) for r in range(W)]
        for r, c, data in sent:
            chunks[(r + 1) % W][c] = data
    return [torch.cat(c).reshape(g.shape) for c, g in zip(chunks, grads)]


def time_all_reduce(numels: list[int], *, repeats: int = 10, device: torch.device | str = "cpu"
                    ) -> list[dict[str, float]]:
    """Time ``all_reduce`` (sum) of fp32 tensors of each size in the running process group.

    Reports the seconds of the fastest of ``repeats`` calls (the cost without interference from other
    programs on a busy machine), the *algorithm bandwidth* bytes / seconds, and the *bus bandwidth*
    algbw * 2 (W-1)/W -- what each rank actually sends in a ring all-reduce (the convention of NVIDIA's
    nccl-tests), which is comparable across world sizes.
    """
    if not dist.is_initialized():
        raise RuntimeError("time_all_reduce needs a running process group: call it inside a script started "
                           "by torchrun (python -m course_lib.distributed.ddp does).")
    world = dist.get_world_size()
    results = []
    for numel in numels:
        tensor = torch.ones(int(numel), dtype=torch.float32, device=device)
        dist.all_reduce(tensor)  # warm-up: sets up the connections for this size
        sync(device)
        dist.barrier()
        seconds = fastest(lambda: dist.all_reduce(tensor), repeats=repeats, warmup=0, device=device)
        nbytes = tensor.numel() * tensor.element_size()
        algbw = nbytes / seconds
        results.append(dict(numel=int(numel), bytes=nbytes, seconds=seconds, algbw_bytes_per_s=algbw,
                            busbw_bytes_per_s=algbw * 2 * (world - 1) / world))
    return results


def _stamp(out: Path, rank: int, point: str) -> None:
    stamp(out, rank, point, first_line=_FIRST_LINE, torch_imported=_TORCH_IMPORTED)


def _worker(spec: DDPSpec, out: Path, allreduce_numels: list[int], script: Path | None = None) -> None:
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world, device = init(group_timeout_s=600.0)
    _stamp(out, rank, "group_ready")
    try:
        if script is not None:   # a data-parallel script written by hand (exercise 10.2), in this same group
            run_script_here(script, ["--out", out / "script", *spec_arguments(spec)])
        model = make_model(spec).to(device)  # same seed everywhere; DDP also broadcasts rank 0's weights
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        rows = slice(rank * spec.batch_per_rank, (rank + 1) * spec.batch_per_rank)  # this rank's share
        batches = ((x[rows].to(device), y[rows].to(device)) for x, y in global_batches(spec, world))
        # DDP all-reduces (averages) the gradients inside backward(), bucket by bucket
        history = train(ddp_model, batches, lm_loss, loop_config(spec, time_steps=True),
                        optimizer=make_optimizer(ddp_model, spec), device=device)
        step_seconds = history.step_seconds
        global_losses = torch.tensor(history.losses, device=device)
        dist.all_reduce(global_losses)
        losses = [loss / world for loss in global_losses.tolist()]
        n_grad = sum(p.numel() for p in model.parameters())
        timings = time_all_reduce(sorted(set(allreduce_numels) | {n_grad}), device=device)
        _stamp(out, rank, "work_done")

        save_file(weights_of(model), str(out / f"weights_rank{rank}.safetensors"))
        if rank == 0:
            result = dict(world_size=world, backend=dist.get_backend(), device=device.type,
                          spec=asdict(spec), losses=losses, step_seconds=step_seconds,
                          gradient_numel=n_grad, all_reduce=timings, torch=torch.__version__)
            (out / "result.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _parse(argv: list[str] | None) -> tuple[DDPSpec, Path, list[int], Path | None]:
    parser = argparse.ArgumentParser(prog="torchrun --standalone --nproc_per_node=2 -m course_lib.distributed.ddp",
                                     description="Train the tiny GPT with DDP and time all-reduces.")
    parser.add_argument("--out", required=True, type=Path, help="folder for weights_rank*.safetensors, result.json")
    for f in fields(DDPSpec):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--allreduce-numels", type=int, nargs="*", default=[2**10, 2**14, 2**18, 2**21, 2**23])
    parser.add_argument("--script", type=Path, default=None, help="a data-parallel script to run first")
    args = parser.parse_args(argv)
    spec = DDPSpec(**{f.name: getattr(args, f.name) for f in fields(DDPSpec)})
    return spec, args.out, args.allreduce_numels, args.script


def main(argv: list[str] | None = None) -> int:
    if "RANK" not in os.environ:
        print("course_lib.distributed.ddp runs under torchrun, e.g.: torchrun --standalone --nproc_per_node=2 "
              "-m course_lib.distributed.ddp --out runs/ddp", file=sys.stderr)
        return 2
    spec, out, numels, script = _parse(argv)
    _worker(spec, out, numels, script)
    return 0


# ------------------------------------------------------------------------------------------------
# Launching from a notebook or a test
# ------------------------------------------------------------------------------------------------


def launch(out: str | Path, *, nproc: int = 2, spec: DDPSpec | None = None,
           allreduce_numels: list[int] | None = None, script: str | Path | None = None, timeout: float = 300) -> dict:
    """Run ``torchrun --standalone --nproc_per_node=nproc -m course_lib.distributed.ddp`` and return its result.json.

    Every rank first runs ``script`` (a data-parallel script written by hand, exercise 10.2) when one is
    given, writing to ``out/script``, then trains the same spec under PyTorch's DistributedDataParallel
    (weights in ``out``), then times all-reduces: one launch, whose start-up is paid once. Uses ``python -m
    torch.distributed.run`` (what the ``torchrun`` command is) with this Python, so it works from a notebook
    whose virtual environment is not on PATH. One thread per process. The result also holds ``"phases"``
    (where the launch's seconds went, :func:`launch_phases`) and, with a script, ``"script_losses"`` (the
    mean over the ranks of the losses it wrote).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer (the number of processes), got {nproc!r}.")
    if script is not None and not Path(script).is_file():
        raise FileNotFoundError(f"no script at {script}: write it first (a %%writefile cell) and run that cell.")
    spec = spec or DDPSpec()
    out = Path(out)
    target = ["-m", "course_lib.distributed.ddp", "--out", str(out), *spec_arguments(spec)]
    if allreduce_numels is not None:
        target += ["--allreduce-numels", *map(str, allreduce_numels)]
    if script is not None:
        target += ["--script", str(Path(script).resolve())]
    job = run_torchrun(target, out, nproc=nproc, timeout_s=timeout, name="'ddp'")
    result = json.loads((out / "result.json").read_text())
    result["phases"] = job["phases"]
    if script is not None:
        per_rank = [json.loads((out / "script" / f"losses_rank{r}.json").read_text()) for r in range(nproc)]
        result["script_losses"] = [sum(step) / nproc for step in zip(*per_rank)]
    return result


def load_weights(out: str | Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """The weights rank ``rank`` saved (safetensors) at the end of a :func:`launch` run."""
    from safetensors.torch import load_file

    path = Path(out) / f"weights_rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {out}: run course_lib.distributed.ddp.launch({str(out)!r}) first.")
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------
# Memory per GPU: when does data parallelism stop being enough?
# ------------------------------------------------------------------------------------------------

# Rajbhandari et al. 2020 (ZeRO), Sec. 3.1: mixed-precision Adam holds 2 bytes of fp16/bf16 weights,
# 2 bytes of fp16/bf16 gradients and K = 12 bytes of optimiser state (fp32 master weights, momentum and
# variance) per parameter: 16 bytes in all.
BYTES_PER_PARAM = {"weights": 2, "gradients": 2, "optimizer": 12}


def memory_per_gpu(n_params: float, *, data: int = 1, zero_stage: int = 0, tensor: int = 1,
                   pipeline: int = 1) -> dict[str, float]:
    """Bytes per GPU (in GB = 1e9 bytes) of weights, gradients and Adam states, without activations.

    ``tensor`` and ``pipeline`` parallelism split the model itself, so they divide all three by
    ``tensor * pipeline``. ZeRO shards over the ``data`` ranks: stage 1 the optimiser states, stage 2 also
    the gradients, stage 3 (= FSDP's full sharding) also the weights. Stage 0 is plain DDP: every rank
    holds everything. Reproduces ZeRO Fig. 1 (7.5B parameters, 64 GPUs: 120, 31.4, 16.6, 1.9 GB).
    """
    if not isinstance(n_params, (int, float)) or isinstance(n_params, bool) or n_params <= 0:
        raise ValueError(f"n_params must be a positive number of parameters, got {n_params!r}.")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0 (plain DDP), 1, 2 or 3, got {zero_stage!r}.")
    for name, degree in (("data", data), ("tensor", tensor), ("pipeline", pipeline)):
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{name} (a parallel degree) must be a positive integer, got {degree!r}.")
    per_model_shard = n_params / (tensor * pipeline)
    sharded = {"optimizer": zero_stage >= 1, "gradients": zero_stage >= 2, "weights": zero_stage >= 3}
    memory = {part: per_model_shard * nbytes / (data if sharded[part] else 1) / 1e9
              for part, nbytes in BYTES_PER_PARAM.items()}
    memory["total"] = sum(memory.values())
    return memory


def gpus_needed(n_params: float, *, gpu_gb: float = 80.0, zero_stage: int = 0, max_gpus: int = 4096,
                **degrees: int) -> int | None:
    """The fewest data-parallel GPUs whose weights + gradients + Adam states fit in ``gpu_gb`` each.

    ``None`` when no number of data-parallel ranks makes it fit (plain DDP and ZeRO-1/2 keep a full
    replica of something on every rank, so adding ranks stops helping).
    """
    if not gpu_gb > 0:
        raise ValueError(f"gpu_gb must be positive, got {gpu_gb!r}.")
    for data in range(1, max_gpus + 1):
        if memory_per_gpu(n_params, data=data, zero_stage=zero_stage, **degrees)["total"] <= gpu_gb:
            return data
    return None


if __name__ == "__main__":
    sys.exit(main())
