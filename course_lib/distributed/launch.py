"""Starting a job on several processes with ``torchrun``, joining its process group, and saying in one sentence
what went wrong when a rank fails.

Explained in notebooks/10_scaling_out.ipynb (a data-parallel script launched on two processes) and
11_model_parallelism.ipynb (each part, and a deliberate failure). Lessons launch either a module of the course
(``course_lib.distributed.ddp``, ``course_lib.distributed.parallel``) or a script a student wrote
(:func:`launch_script`); the launch is the same:

    torchrun --standalone --nproc_per_node=2 <script or -m module> --out FOLDER [arguments]

A script the course runs inside one of its own jobs (:func:`run_script_here`) joins that job's group: its
:func:`init` returns the group, its :func:`finish` leaves it standing. :func:`launch_scripts` runs several short
scripts in one launch that way (the tests' catalogues of wrong scripts).

Every rank that uses :func:`init` gets a process group with a timeout, so a receive that no send matches,
or a collective a dead rank never joins, raises instead of hanging. Ranks write when they reached each point
of their life (:func:`stamp`), so :func:`launch_phases` can say where a launch's seconds went.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from course_lib.tools.timing import Stopwatch, now

__all__ = ["ParallelJobFailed", "init", "finish", "backend_for", "device_for_rank", "stamp", "launch_phases",
           "describe_phases", "run_torchrun", "launch_script", "run_script_here", "launch_scripts", "PHASES"]


class ParallelJobFailed(RuntimeError):
    """A multi-process job failed; the message says which rank did what, in one sentence.

    ``phases`` holds where the job's seconds went (:func:`launch_phases`; empty when the job was stopped for
    running past its time limit).
    """

    def __init__(self, message: str, phases: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.phases = phases or {}


# ------------------------------------------------------------------------------------------------
# Inside each process
# ------------------------------------------------------------------------------------------------


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_for_rank(local_rank: int, local_world_size: int) -> torch.device:
    """One GPU per rank when this machine has enough of them, else the CPU (every rank on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(group_timeout_s: float = 30.0) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun set up (its env variables), with a timeout in seconds.

    Returns (rank, world size, device): one CUDA GPU per rank when there are enough of them (NCCL),
    else the CPU (gloo). Inside a process whose group already exists (a script the course runs within one
    of its own jobs, :func:`run_script_here`) it joins nothing and returns that group's rank and size;
    :func:`finish` then leaves the group to whoever formed it.
    """
    global _FORMED_HERE
    if "RANK" not in os.environ:
        raise RuntimeError("init() joins the process group torchrun sets up: run this under torchrun, e.g. "
                           "torchrun --standalone --nproc_per_node=2 script.py (or launch_script from a notebook).")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = device_for_rank(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device), timeout=datetime.timedelta(seconds=group_timeout_s))
    _FORMED_HERE = True
    return rank, world, device


_FORMED_HERE = False   # whether init() formed the process group of this process (and finish() may end it)


def finish() -> None:
    """Leave the process group at the end of a script: destroy it if :func:`init` formed it here."""
    global _FORMED_HERE
    if _FORMED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _FORMED_HERE = False


# ------------------------------------------------------------------------------------------------
# Where the seconds of a launch go: every rank writes when it reached each point
# ------------------------------------------------------------------------------------------------


# The points a rank passes, in order, and the name of the phase that ends at each of them.
PHASES = (
    ("first_line", "torchrun and the Python processes starting"),
    ("torch_imported", "importing torch"),
    ("group_ready", "forming the process group"),
    ("work_done", "the work itself"),
)



def stamp(out: Path, rank: int, point: str, *, first_line: float, torch_imported: float) -> None:
    """Record that this rank reached ``point`` now (wall clock, ``timing.now()``) in ``out/stamps_rank{rank}.json``.

    The file is rewritten at every point, so a rank that dies keeps the points it had reached. The first
    call also records when the running module started and when it had imported torch: module-level
    ``time.time()`` stamps of the module that torchrun started, taken before torch (and so before this
    module) could be imported.
    """
    path = Path(out) / f"stamps_rank{rank}.json"
    stamps = json.loads(path.read_text()) if path.is_file() else {"first_line": first_line,
                                                                  "torch_imported": torch_imported}
    stamps[point] = now()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamps))



def launch_phases(out: Path, launched: float, finished: float) -> dict[str, float]:
    """Seconds of each phase of a launch, from the stamps its ranks wrote (``time.time()`` of one machine).

    A phase ends when the *last* rank reached its point (the job waits for the slowest). The phases are
    those of :data:`PHASES`, then, for a job that failed, ``"until a rank gave up"`` (the first rank's
    ``error`` point) instead of the work; the rest up to ``finished`` is ``"ending the job"`` (results
    written, the last barrier, processes stopped). ``launched`` and ``finished`` are the launcher's
    ``time.time()`` before starting torchrun and after it returned.
    """
    ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("stamps_rank*.json"))]
    phases: dict[str, float] = {}
    previous = launched
    for point, name in PHASES:
        reached = [r[point] for r in ranks if point in r]
        if point == "work_done" and any("error" in r for r in ranks):
            point, name, reached = "error", "until a rank gave up", [min(r["error"] for r in ranks if "error" in r)]
        if not reached:
            break
        phases[name] = max(max(reached), previous) - previous
        previous = max(max(reached), previous)
    phases["ending the job"] = max(finished - previous, 0.0)
    return phases



def describe_phases(phases: dict[str, float]) -> str:
    """``"24.5 s in all: 6.0 s torchrun and the Python processes starting, 9.1 s importing torch, ..."``"""
    total = sum(phases.values())
    return f"{total:.1f} s in all: " + ", ".join(f"{s:.1f} s {name}" for name, s in phases.items())


# ------------------------------------------------------------------------------------------------
# From a notebook or a test: start torchrun, wait for it, explain a failure
# ------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still one of this job's Python workers (a pid number may have been reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"course_lib" in f.read()
    except OSError:
        return False


def _kill_leftovers(out: Path) -> list[int]:
    """SIGKILL every worker of this job that is still running (found by the pid files it wrote)."""
    killed = []
    for path in out.glob("pid_rank*"):
        pid = int(path.read_text() or 0)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _last_error_line(log: str) -> str:
    """The line of torchrun's output that says what went wrong: the last exception line (``SomeError: ...``)
    if there is one, else the last line with words in it (torchrun ends with rows of '=' and '-')."""
    lines = [line.strip() for line in log.splitlines() if re.search(r"[A-Za-z]", line)]
    errors = [line for line in lines if re.match(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1]


def _failure_sentence(name: str, nproc: int, out: Path, log: str, course_workers: bool) -> str:
    lines = {int(p.stem.removeprefix("error_rank")): p.read_text().strip() for p in out.glob("error_rank*.txt")}
    pids = {int(p.read_text() or 0): int(p.name.removeprefix("pid_rank")) for p in out.glob("pid_rank*")}
    for code, pid in re.findall(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", log):
        rank = pids.get(int(pid))
        if rank is not None and rank not in lines and int(code) > 0:
            lines[rank] = f"rank {rank} died with exit code {code} without an error message"
    if not lines:
        # the course's workers write a pid file first thing and an error line for any exception they see
        before = course_workers and not any(out.glob("pid_rank*"))
        return (f"the {nproc}-process job {name} failed{' before any rank started its work' if before else ''}: "
                f"{_last_error_line(log)[:300]}")

    def consequence(rank: int) -> int:  # the cause first: a death or an error, then a wait, then a lost link
        return 2 if "lost its connection" in lines[rank] else 1 if " waited " in lines[rank] else 0

    order = sorted(lines, key=lambda r: (consequence(r), r))
    return f"the {nproc}-process job {name} failed: " + "; ".join(lines[r] for r in order) + "."


def _check_nproc(nproc: Any, timeout_s: Any) -> None:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer (the number of processes), got {nproc!r}.")
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")


def run_torchrun(target: list[str], out: str | Path, *, nproc: int = 2, timeout_s: float = 300.0,
                 name: str = "job", course_workers: bool = True) -> dict[str, Any]:
    """Run ``torchrun --standalone --nproc_per_node=nproc TARGET...`` with one torch thread per process and
    return ``{"seconds", "phases", "log"}``; a failure raises :class:`ParallelJobFailed` with one sentence.

    ``target`` is what torchrun runs (``["-m", "course_lib.distributed.ddp", "--out", ...]`` or
    ``["script.py", ...]``). No worker process is left running either way. ``course_workers`` says the
    target is a module of the course, whose workers write pid files and one error line each: a job whose
    workers never started (a failure inside torchrun's own start-up, seen once in CI) then gets one more try.
    """
    _check_nproc(nproc, timeout_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("rank*.json"), *out.glob("error_rank*.txt"), *out.glob("pid_rank*"),
                  *out.glob("stamps_rank*.json")]:
        stale.unlink()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.1", *map(str, target)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in (1, 2):
        launched = now()
        with Stopwatch() as watch:
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            log = _wait(process, out, name, nproc, timeout_s)
        phases = launch_phases(out, launched, launched + watch.seconds)
        retry = course_workers and attempt == 1 and not any(out.glob("pid_rank*"))
        if process.returncode == 0 or not retry:
            break
    if process.returncode != 0:
        raise ParallelJobFailed(_failure_sentence(name, nproc, out, log, course_workers), phases)
    return dict(seconds=watch.seconds, phases=phases, log=log)


def _wait(process: subprocess.Popen, out: Path, name: str, nproc: int, timeout_s: float) -> str:
    try:
        log, _ = process.communicate(timeout=timeout_s)
        return log
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise ParallelJobFailed(f"the {nproc}-process job {name} did not finish within {timeout_s:g} s and was "
                                f"stopped; raise timeout_s or make the job smaller.") from None
    finally:
        _kill_leftovers(out)


def launch_script(script: str | Path, out: str | Path, *, nproc: int = 2, args: list[str] | tuple = (),
                  timeout_s: float = 300.0) -> dict[str, Any]:
    """Run a training script (one a student wrote with ``%%writefile``) on ``nproc`` processes:
    ``torchrun --standalone --nproc_per_node=nproc SCRIPT --out OUT ARGS``. Returns ``{"seconds", "phases",
    "log"}`` (the log holds what the ranks printed); a failure raises :class:`ParallelJobFailed` quoting the
    last error line of the script."""
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"no script at {script}: write it first (a %%writefile cell) and run that cell.")
    return run_torchrun([str(script), "--out", str(out), *map(str, args)], out, nproc=nproc, timeout_s=timeout_s,
                        name=repr(script.name), course_workers=False)


# ------------------------------------------------------------------------------------------------
# Scripts inside a course job, and several short scripts in one launch
# ------------------------------------------------------------------------------------------------


def run_script_here(script: str | Path, argv: list[str] | tuple = ()) -> None:
    """Run ``script`` as ``__main__`` with these command-line arguments inside this rank, whose process group
    already exists: the script's :func:`init` joins it, and its :func:`finish` (or its own
    ``dist.destroy_process_group()``) leaves it standing for what the job does next."""
    global _FORMED_HERE
    saved, formed, destroy = sys.argv, _FORMED_HERE, dist.destroy_process_group
    sys.argv, _FORMED_HERE = [str(script), *map(str, argv)], False
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, _FORMED_HERE, dist.destroy_process_group = saved, formed, destroy


def launch_scripts(jobs: list[tuple[str | Path, str | Path, list[str]]], folder: str | Path, *, nproc: int = 2,
                   group_timeout_s: float = 30.0, timeout_s: float = 300.0) -> list[str | None]:
    """Run several short scripts one after the other in ONE torchrun job of ``nproc`` processes.

    ``jobs`` are (script, out folder, more arguments); each script runs as ``SCRIPT --out OUT ARGS`` in every
    rank, all of them in one process group. Starting the processes and importing torch, most of a small
    launch's seconds, are paid once: the tests run a check's catalogue of wrong scripts this way. Returns, per
    job, the first error line of the lowest rank that raised, or None. A script that raises on one rank only
    leaves the other waiting in its next collective until ``group_timeout_s``; keep such scripts apart.
    """
    _check_nproc(nproc, timeout_s)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = [dict(script=str(Path(script).resolve()), out=str(Path(out).resolve()), args=[str(a) for a in args])
            for script, out, args in jobs]
    for job in spec:
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        for stale in Path(job["out"]).glob("error_rank*.txt"):
            stale.unlink()
    (folder / "jobs.json").write_text(json.dumps(spec, indent=1))
    run_torchrun(["-m", "course_lib.distributed.launch", str(folder / "jobs.json"), str(group_timeout_s)], folder,
                 nproc=nproc, timeout_s=timeout_s, name="'scripts'")
    errors: list[str | None] = []
    for job in spec:
        lines = sorted(Path(job["out"]).glob("error_rank*.txt"))
        errors.append(lines[0].read_text().strip() if lines else None)
    return errors


def _run_jobs(jobs_file: Path, group_timeout_s: float) -> None:
    """What every rank of :func:`launch_scripts` runs: the jobs in order, one barrier after each."""
    rank = int(os.environ.get("RANK", 0))
    (jobs_file.parent / f"pid_rank{rank}").write_text(str(os.getpid()))
    init(group_timeout_s)
    for job in json.loads(jobs_file.read_text()):
        try:
            run_script_here(job["script"], ["--out", job["out"], *job["args"]])
        except SystemExit as ended:
            if ended.code not in (0, None):
                (Path(job["out"]) / f"error_rank{rank}.txt").write_text(f"SystemExit: {ended.code}")
        except Exception as error:  # noqa: BLE001 -- each job's error is its own result
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            (Path(job["out"]) / f"error_rank{rank}.txt").write_text(f"{type(error).__name__}: {first}"[:400])
        dist.barrier()
    finish()


if __name__ == "__main__":
    from course_lib.distributed import launch as _launch   # the module the scripts import, not a second copy

    _launch._run_jobs(Path(sys.argv[1]), float(sys.argv[2]))
    # Everything is written and the group destroyed: leave without the interpreter's teardown, as
    # course_lib.distributed.parallel does (a thread of gloo or of a device mesh, still joinable when C++
    # destroyed it, sometimes aborted a finished rank on a busy machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
