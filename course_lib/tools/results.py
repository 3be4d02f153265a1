"""Recorded runs: results of a bigger profile saved with their provenance, shown by smaller ones.

Used by notebooks 03-09. A run on the ``gpu`` (or ``cpu``) profile calls
``record("finetuning", profile, {...})``, which writes ``data/results/finetuning_<profile>.json`` with
the command-line, hardware, library versions and date beside the numbers. A smaller profile calls
``recorded("finetuning", "cpu")`` and shows what it finds, labelled as recorded — never as its own
measurement. Nothing here invents a number: if no run was recorded, ``recorded`` returns ``None``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from course_lib.tools.profiles import REPO, Profile, code_version, cpu_name, machine_load, package_versions

RESULTS = REPO / "data" / "results"


def provenance(profile: Profile) -> dict[str, Any]:
    """Where and how a result was obtained."""
    import torch

    return {
        "profile": profile.name,
        "device": str(profile.device),
        "hardware": torch.cuda.get_device_name(0) if profile.is_gpu else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "command": _command(),
        "commit": code_version(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        **machine_load(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _command() -> str:
    program = Path(sys.argv[0]).name
    if program == "ipykernel_launcher.py":  # its arguments are a temporary connection file, useless later
        return f"a Jupyter kernel (COURSE_PROFILE={os.environ.get('COURSE_PROFILE', 'unset')})"
    return " ".join([program, *sys.argv[1:]])


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def path_for(name: str, profile_name: str) -> Path:
    """``data/results/NAME_PROFILE.json``; both parts must be plain names, so a record stays in that folder."""
    for what, value in (("name", name), ("profile name", profile_name)):
        if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"the record's {what} must be a plain name of letters, digits, '_', '-' and '.' "
                             f"(like 'finetuning' or 'cpu'), got {value!r}: records live in data/results/ only.")
    return RESULTS / f"{name}_{profile_name}.json"


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy and torch scalars become numbers, tuples lists), or a TypeError
    naming the first part JSON cannot hold, e.g. ``results['seen']``."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"results{where} has the key {key!r}, a {type(key).__name__}; JSON keys are "
                                f"strings or numbers: use str(key).")
        return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "item") and tuple(shape) == ():  # a numpy or torch scalar
        return value.item()
    if shape is not None and hasattr(value, "tolist"):
        kind = f"{type(value).__module__.split('.')[0]}.{type(value).__name__}"
        raise TypeError(f"results{where} is a {kind} of shape {tuple(value.shape)}; record it as a list with "
                        f".tolist().")
    hint = ("sorted(...) gives a list" if isinstance(value, (set, frozenset))
            else "give a number, a string, a list or a dict")
    raise TypeError(f"results{where} is a {type(value).__name__}, which JSON cannot hold: {hint}.")


def record(name: str, profile: Profile, results: dict[str, Any], *, note: str = "", path: Path | None = None) -> Path:
    """Save ``results`` of this run with its provenance; returns the file written.

    The file appears complete or not at all: it is written to a temporary file beside it and renamed
    over the old record, so a run killed while writing leaves the previous record intact. ``path`` writes
    somewhere else than ``data/results/NAME_PROFILE.json`` (a smoke run's ``--out``), the same way."""
    target = path_for(name, profile.name) if path is None else Path(path)
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict of what the run measured, got a {type(results).__name__}.")
    payload = {"name": name, "provenance": provenance(profile), "note": note, "results": _plain(results, "")}
    _write_whole(target, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return target


def _write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # a temporary file is private (0600); a record is not
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def recorded(name: str, profile_name: str) -> dict[str, Any] | None:
    """The recorded run of ``name`` on ``profile_name``, or ``None`` if there is none."""
    path = path_for(name, profile_name)
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not a readable record ({error}): restore it with git, or record the run "
                         f"again.") from None
    if not isinstance(run, dict) or not isinstance(run.get("provenance"), dict) or "results" not in run:
        raise ValueError(f"{path} is not a recorded run (it lacks provenance or results): restore it with git, "
                         f"or record the run again.")
    return run


def describe(run: dict[str, Any]) -> str:
    """One line saying where a recorded run came from."""
    p = run["provenance"]
    commit = str(p.get("commit", "commit not recorded"))
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    return (f"recorded run on the {p['profile']} profile, {p['hardware']} ({p['device']}), "
            f"torch {p['versions'].get('torch', '?')}, {p['date']}, code {commit}")
