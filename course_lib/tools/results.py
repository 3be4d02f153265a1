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
import sys
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


def path_for(name: str, profile_name: str) -> Path:
    return RESULTS / f"{name}_{profile_name}.json"


def record(name: str, profile: Profile, results: dict[str, Any], *, note: str = "") -> Path:
    """Save ``results`` of this run with its provenance; returns the file written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path_for(name, profile.name)
    payload = {"name": name, "provenance": provenance(profile), "note": note, "results": results}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float) + "\n")
    temporary.replace(path)
    return path


def recorded(name: str, profile_name: str) -> dict[str, Any] | None:
    """The recorded run of ``name`` on ``profile_name``, or ``None`` if there is none."""
    path = path_for(name, profile_name)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def describe(run: dict[str, Any]) -> str:
    """One line saying where a recorded run came from."""
    p = run["provenance"]
    commit = str(p.get("commit", "commit not recorded"))
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    return (f"recorded run on the {p['profile']} profile, {p['hardware']} ({p['device']}), "
            f"torch {p['versions'].get('torch', '?')}, {p['date']}, code {commit}")
