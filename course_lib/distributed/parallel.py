"""Run one part of the model-parallelism lesson on several processes, and fail fast when one goes wrong.

Explained in notebooks/11_model_parallelism.ipynb. Each part is a module with a ``Spec`` dataclass and a
``worker(spec, rank, world, device) -> dict`` that every process runs:

=========  ==============================  =======================================================
part       module                          what the processes do
=========  ==============================  =======================================================
tensor     course_lib.distributed.tensor_parallel      one transformer block split Megatron-style (columns, rows, heads)
pipeline   course_lib.distributed.pipeline             the tiny GPT in stages, GPipe with micro-batches
sharded    course_lib.distributed.sharded              DDP, ZeRO stage 1 and FSDP2 on the same batches
fault      (this module)                   a receive that is never matched, or a rank that dies
all        (this module)                   tensor, pipeline and sharded in one launch (for the tests)
=========  ==============================  =======================================================

The same command runs on a laptop (gloo on CPUs), on one node with N GPUs (NCCL, chosen by
:func:`course_lib.distributed.launch.backend_for` when every rank gets its own GPU) and on several machines::

    torchrun --standalone --nproc_per_node=2 -m course_lib.distributed.parallel tensor --out runs/tp
    torchrun --standalone --nproc_per_node=8 -m course_lib.distributed.parallel pipeline --out runs/pp
    # on each of 2 machines (the same command; HEAD is the address of one of them):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 \\
        --rdzv-id=course -m course_lib.distributed.parallel sharded --out runs/fsdp

Every process group gets a timeout (``--group-timeout``, seconds): a receive that no send matches, or a
collective that a dead rank never joins, raises in that many seconds instead of hanging forever; each
rank writes one line saying what went wrong, and :func:`launch` turns those lines into one sentence.
"""

from __future__ import annotations

import time

_FIRST_LINE = time.time()  # when this module started running, before torch: see launch.launch_phases

import argparse  # noqa: E402 (after the time stamp above, on purpose)
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from course_lib.distributed.launch import ParallelJobFailed, init, run_torchrun, stamp  # noqa: E402,F401
from course_lib.tools.timing import Stopwatch  # noqa: E402

_TORCH_IMPORTED = time.time()

__all__ = ["PARTS", "ParallelJobFailed", "launch", "init", "spec_from", "describe_error", "main"]

PARTS = {"tensor": "course_lib.distributed.tensor_parallel", "pipeline": "course_lib.distributed.pipeline",
         "sharded": "course_lib.distributed.sharded", "fault": "course_lib.distributed.parallel", "all": "course_lib.distributed.parallel"}
FAULTS = ("unmatched-recv", "dead-rank")


# ------------------------------------------------------------------------------------------------
# Inside each process
# ------------------------------------------------------------------------------------------------


def spec_from(spec_class: type, options: dict[str, Any]) -> Any:
    """``spec_class(**options)``, with one sentence for an unknown option."""
    known = {f.name for f in fields(spec_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{spec_class.__name__} has no option {unknown[0]!r}; its options are {sorted(known)}.")
    return spec_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def describe_error(error: BaseException, rank: int, timeout_s: float) -> str:
    """One line for what went wrong in this rank (gloo's and NCCL's messages are long and technical)."""
    text = str(error)
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        op = re.search(r"for (\w+) operation", text)
        where = f" in {op.group(1)}" if op else ""
        return (f"rank {rank} waited {timeout_s:g} s{where} for a message or a collective that never came "
                f"(a receive without a matching send, or a rank that stopped)")
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return f"rank {rank} lost its connection to another rank (that rank died)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"rank {rank} raised {type(error).__name__}: {first[:200]}"


def _fault_worker(mode: str, rank: int, world: int, device: torch.device) -> dict:
    """Deliberate failures, for the lesson and the tests: they must end in seconds, not hang."""
    x = torch.zeros(4, device=device)
    if mode == "unmatched-recv":
        if rank == 1:
            dist.recv(x, src=0)      # rank 0 never sends: this waits until the group's timeout
        else:
            dist.barrier()           # rank 0 waits at a barrier rank 1 never reaches
    elif mode == "dead-rank":
        if rank == 1:
            os._exit(3)              # dies without a word, like a process killed by the OOM killer
        dist.all_reduce(x)           # rank 0 waits for a partner that is gone
    return {"survived": True}


def _stamp(out: Path, rank: int, point: str) -> None:
    stamp(out, rank, point, first_line=_FIRST_LINE, torch_imported=_TORCH_IMPORTED)


def _run(part: str, out: Path, options: dict[str, Any], group_timeout_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    (out / f"pid_rank{rank}").write_text(str(os.getpid()))
    (out / f"error_rank{rank}.txt").unlink(missing_ok=True)
    try:
        rank, world, device = init(group_timeout_s)
        _stamp(out, rank, "group_ready")
        watch = Stopwatch(device).start()
        if part == "fault":
            result = _fault_worker(options.get("mode", "unmatched-recv"), rank, world, device)
        elif part == "all":  # options: {"tensor": {...}, "pipeline": {...}, "sharded": {...}}; a list runs each
            result = {}
            for name in ("tensor", "pipeline", "sharded"):
                module = importlib.import_module(PARTS[name])
                given = options.get(name, {})
                runs = [module.worker(spec_from(module.Spec, o), rank, world, device)
                        for o in (given if isinstance(given, list) else [given])]
                result[name] = runs if isinstance(given, list) else runs[0]
        else:
            module = importlib.import_module(PARTS[part])
            result = module.worker(spec_from(module.Spec, options), rank, world, device)
        result.update(rank=rank, world_size=world, backend=dist.get_backend(), device=device.type,
                      worker_seconds=watch.stop())
        _stamp(out, rank, "work_done")
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    except BaseException as error:
        _stamp(out, rank, "error")
        (out / f"error_rank{rank}.txt").write_text(describe_error(error, rank, group_timeout_s))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrun --standalone --nproc_per_node=2 -m course_lib.distributed.parallel",
                                     description="One part of notebooks/11_model_parallelism.ipynb.")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", required=True, type=Path, help="folder for rank*.json")
    parser.add_argument("--options", default="{}", help="JSON object of the part's Spec fields")
    parser.add_argument("--group-timeout", type=float, default=30.0,
                        help="seconds a rank waits for a message or a collective before it gives up")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if "RANK" not in os.environ:
        print("course_lib.distributed.parallel runs under torchrun, e.g.: torchrun --standalone --nproc_per_node=2 "
              "-m course_lib.distributed.parallel tensor --out runs/tp", file=sys.stderr)
        return 2
    args = _parse(argv)
    _run(args.part, args.out, json.loads(args.options), args.group_timeout)
    # The results are written and the group is destroyed. Leave without the interpreter's teardown: under
    # load, a thread left behind by gloo or the device mesh was sometimes still joinable when C++ destroyed
    # it, and std::terminate aborted the finished rank (SIGABRT, "terminate called without an active
    # exception"; 3 of 45 launches of the tensor part on a busy 2-core machine), failing a job whose work
    # had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# From a notebook or a test: start torchrun, collect the results, explain a failure
# ------------------------------------------------------------------------------------------------


def launch(part: str, out: str | Path, *, nproc: int = 2, options: dict[str, Any] | Any | None = None,
           group_timeout_s: float = 30.0, timeout_s: float = 300.0) -> dict[str, Any]:
    """Run ``torchrun --standalone --nproc_per_node=nproc -m course_lib.distributed.parallel PART`` and collect it.

    ``options`` are the part's ``Spec`` fields (a dict or the Spec itself). Returns ``{"part", "world_size",
    "backend", "device", "seconds", "phases", "ranks": [the dict each rank's worker returned, by rank]}``;
    ``phases`` says where the seconds went (:func:`course_lib.distributed.launch.launch_phases`). A failure raises
    :class:`ParallelJobFailed` with one sentence (and the phases); no worker process is left running
    either way.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: choose one of {sorted(PARTS)}.")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer (the number of processes), got {nproc!r}.")
    if not group_timeout_s > 0 or not timeout_s > 0:
        raise ValueError("group_timeout_s and timeout_s must be positive numbers of seconds.")
    options = asdict(options) if options is not None and not isinstance(options, dict) else dict(options or {})
    if part == "fault" and options.get("mode", FAULTS[0]) not in FAULTS:
        raise ValueError(f"unknown fault mode {options['mode']!r}: choose one of {FAULTS}.")
    out = Path(out)
    job = run_torchrun(["-m", "course_lib.distributed.parallel", part, "--out", str(out), "--options",
                        json.dumps(options), "--group-timeout", str(group_timeout_s)], out, nproc=nproc,
                       timeout_s=timeout_s, name=repr(part))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return dict(part=part, world_size=ranks[0]["world_size"], backend=ranks[0]["backend"],
                device=ranks[0]["device"], seconds=job["seconds"], phases=job["phases"], ranks=ranks)


if __name__ == "__main__":
    sys.exit(main())
