"""What the checks of a script a student wrote share (exercises 10.2 and 11.1): read it, launch it, read back.

A distributed exercise is a file (a ``%%writefile`` cell), run by torchrun on two processes, so the rule
"an answer that calls the reference is refused" cannot watch its calls from the notebook's process: the
script's source is read instead, and an import or a use of a forbidden name refuses it before anything runs.
The run itself goes through :func:`course_lib.distributed.launch.launch_script`; what the ranks wrote (safetensors,
never pickles) is read back from its ``--out`` folder. The tests run a check's catalogue of wrong scripts in one
launch (``launch.launch_scripts``) and hand each one's folder to the same :func:`judge`-style functions.
"""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path

import torch

from course_lib.checks.framework import (
    NotAttempted, ReferenceCalled, StudentCodeError, fail, not_attempted_message, stub_message,
)

__all__ = ["read_script", "run_script", "failure_sentence", "load_per_rank"]


def _names_used(tree: ast.AST) -> set[str]:
    """Every dotted name a script imports or reads, spelled out through its imports (``DDP`` ->
    ``torch.nn.parallel.DistributedDataParallel``)."""
    aliases: dict[str, str] = {}
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                used.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                used.add(f"{node.module}.{alias.name}")
    for node in ast.walk(tree):
        parts: list[str] = []
        walk = node
        while isinstance(walk, ast.Attribute):
            parts.append(walk.attr)
            walk = walk.value
        if isinstance(walk, ast.Name) and walk.id in aliases and (parts or isinstance(node, ast.Name)):
            used.add(".".join([aliases[walk.id], *reversed(parts)]))
    return used


def read_script(path: str | Path, exercise: str, forbidden: tuple[str, ...]) -> str:
    """The source of the student's script, after refusing, in one sentence each: no file, an untouched stub, a
    file that is not Python, and a script that uses one of the ``forbidden`` dotted names (or what lies under
    them: ``"torch.nn.parallel"`` covers ``DistributedDataParallel``)."""
    __tracebackhide__ = True
    path = Path(path)
    if not path.is_file():
        fail(f"there is no script at {path}: run the exercise's %%writefile cell first, then this check.")
    source = path.read_text()
    if stub_message(exercise) in source:
        raise NotAttempted(not_attempted_message(stub_message(exercise)))
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise StudentCodeError(f"your script is not valid Python: {error.msg} on line {error.lineno}.") from None
    for name in sorted(_names_used(tree)):
        hit = next((f for f in forbidden if name == f or name.startswith(f + ".")), None)
        if hit is not None:
            raise ReferenceCalled(f"your answer calls the course's reference `{name}`; write it yourself.")
    return source


def failure_sentence(message: str) -> str:
    """The launch's one sentence without its prefix ("the 2-process job 'x.py' failed: "), torchrun's
    "[rank1]: " turned into words."""
    text = message.split(" failed: ", 1)[-1].strip().rstrip(".")
    prefixed = re.match(r"\[rank(\d+)\]:\s*(.*)", text)
    return f"{prefixed.group(2)} (rank {prefixed.group(1)})" if prefixed else text


def run_script(path: str | Path, exercise: str, args: list[str], *, timeout_s: float = 90.0) -> tuple[Path, str | None]:
    """Launch the script on two processes; returns (its --out folder, None) or (folder, what went wrong).

    A rank that reached a stub (a function still raising ``NotImplementedError``) makes it :class:`NotAttempted`."""
    __tracebackhide__ = True
    from course_lib.distributed.launch import ParallelJobFailed, launch_script

    out = Path(tempfile.mkdtemp(prefix=f"check_{exercise.replace('.', '_')}_"))
    try:
        launch_script(path, out, nproc=2, args=args, timeout_s=timeout_s)
    except ParallelJobFailed as failure:
        if stub_message(exercise) in str(failure):
            raise NotAttempted(not_attempted_message(stub_message(exercise))) from None
        return out, failure_sentence(str(failure))
    return out, None


def load_per_rank(out: Path, name: str, world: int) -> list[dict[str, torch.Tensor]] | None:
    """``out/{name}_rank{r}.safetensors`` for every rank, or None when one is missing."""
    from safetensors.torch import load_file

    paths = [out / f"{name}_rank{r}.safetensors" for r in range(world)]
    if not all(p.is_file() for p in paths):
        return None
    return [load_file(str(p)) for p in paths]
