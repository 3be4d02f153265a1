"""Install the course's JupyterLab defaults into the environment that runs this script.

Run it with the course environment's Python (``make setup`` does)::

    .venv/bin/python jupyter/install_settings.py            # install
    .venv/bin/python jupyter/install_settings.py --check    # exit 1 if not installed / out of date
    .venv/bin/python jupyter/install_settings.py --remove   # take them out again

It copies two files of this folder into the environment's own Jupyter directories, the places
Jupyter reads for settings that an environment ships; the user's files (``~/.jupyter``,
``overrides.json``) are never touched:

* ``overrides.json`` -> ``{sys.prefix}/share/jupyter/lab/settings/overrides.d/llm-course.json``:
  JupyterLab setting defaults (start the preferred kernel without asking; record when each cell runs, in
  the cell's metadata, so ``scripts/core_path_time.py --worked`` can measure how long a lesson really took; no
  news feed or update check: the course runs offline).
  ``overrides.d`` is JupyterLab's folder for package-owned overrides; ``overrides.json`` beside it
  stays the user's.
* ``jupyter_server_config.json`` -> merged into ``{sys.prefix}/etc/jupyter/jupyter_server_config.json``
  (the environment's server config; Jupyter reads ``jupyter_server_config.d/`` only for enabling
  server extensions, so plain settings must go into the file itself; keys already there that are not
  ours are kept): the server offers only the course kernel (``llm-course``, registered by ``make setup``) and makes
  it the default. The committed notebooks name the kernelspec ``python3``; when that name is not on
  offer, JupyterLab picks the one offered kernel of the notebook's language, so every notebook opens
  on the course kernel without a dialog.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "llm-course.json"


def targets(prefix: Path | str = sys.prefix) -> dict[Path, Path]:
    """Which file of this folder goes where under the environment ``prefix``: the lab overrides get a
    file of their own, the server settings are merged into the environment's server config."""
    prefix = Path(prefix)
    return {
        HERE / "overrides.json": prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / NAME,
        HERE / "jupyter_server_config.json": prefix / "etc" / "jupyter" / "jupyter_server_config.json",
    }


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix the file and run this again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold one JSON object; fix the file and run this again.")
    return data


def course_kernel() -> str:
    """The kernel name the server config allows (the Makefile's KERNEL)."""
    config = _load(HERE / "jupyter_server_config.json")
    return config["MultiKernelManager"]["default_kernel_name"]


def _merged(source: Path, target: Path) -> dict:
    """The target's JSON with the source's settings written over it, two levels deep
    (class -> trait), so settings of other classes or traits stay."""
    ours = _load(source)
    if source.name == "overrides.json" or not target.exists():
        return ours
    merged = _load(target)
    for section, values in ours.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def install(prefix: Path | str = sys.prefix) -> list[Path]:
    """Write the settings into ``prefix``; return the written paths. Idempotent."""
    written = []
    for source, target in targets(prefix).items():
        text = json.dumps(_merged(source, target), indent=2) + "\n"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        written.append(target)
    return written


def _contains(installed: dict, ours: dict) -> bool:
    return all(isinstance(installed.get(section), dict) and isinstance(values, dict)
               and all(installed[section].get(key) == value for key, value in values.items())
               if isinstance(values, dict) else installed.get(section) == values
               for section, values in ours.items())


def missing(prefix: Path | str = sys.prefix) -> list[Path]:
    """The installed files that are absent or lack this folder's settings (empty when up to date)."""
    return [target for source, target in targets(prefix).items()
            if not target.exists() or not _contains(_load(target), _load(source))]


def remove(prefix: Path | str = sys.prefix) -> list[Path]:
    """Take this folder's settings out again; return the files changed or deleted."""
    changed = []
    for source, target in targets(prefix).items():
        if not target.exists():
            continue
        remaining = {} if source.name == "overrides.json" else _load(target)
        for section, values in _load(source).items():
            if isinstance(values, dict) and isinstance(remaining.get(section), dict):
                for key in values:
                    remaining[section].pop(key, None)
                if not remaining[section]:
                    del remaining[section]
            else:
                remaining.pop(section, None)
        if remaining:
            target.write_text(json.dumps(remaining, indent=2) + "\n", encoding="utf-8")
        else:
            target.unlink()
        changed.append(target)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the course's JupyterLab and Jupyter server defaults "
                                                 "into this Python environment.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when the settings are missing or out of date")
    group.add_argument("--remove", action="store_true", help="remove the installed settings")
    parser.add_argument("--prefix", default=sys.prefix, help="environment prefix (default: this Python's)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = missing(args.prefix)
            for path in stale:
                print(f"missing or out of date: {path}; run `make setup`.", file=sys.stderr)
            return 1 if stale else 0
        if args.remove:
            for path in remove(args.prefix):
                print(f"removed the course settings from {path}")
            return 0
        for path in install(args.prefix):
            print(f"JupyterLab settings installed: {path}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
