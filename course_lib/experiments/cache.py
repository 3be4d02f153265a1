"""The run cache of the recorded experiments: finished runs kept one JSON line each, so that an interrupted
record resumes where it stopped and several processes can share one experiment's runs.

Used by ``course_lib.experiments.finetuning`` and ``course_lib.experiments.lora``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def run_load() -> float | None:
    """The machine's 1-minute load average as a run ends: every recorded run keeps it, so its seconds can be
    read (a run beside other busy processes is slower, and small models on a CPU are slowed most)."""
    from course_lib.tools.profiles import machine_load

    return machine_load()["load_average_1min"]


def sizes_for(table: Mapping[str, dict[str, Any]], profile: Any, quick: bool) -> dict[str, Any]:
    name = "quick" if quick else getattr(profile, "name", profile)
    if name not in table:
        raise ValueError(f"no sizes for profile {name!r}: choose one of {', '.join(table)}.")
    return dict(table[name])



# Part of every cached run's key: bump it whenever a change alters what a run computes (data, model,
# training loop, evaluation), so that no number made by older code is reused.
RUN_CODE_VERSION = 3



# Sizes that only say *which* runs an experiment makes (a grid, the ranks), not what one run computes.
_NOT_IN_RUN_KEY = ("lrs", "ranks", "search_rank", "seeds")



WORKER_ENV = "COURSE_EXPERIMENT_WORKER"



def is_worker() -> bool:
    """Whether this process is an extra worker of a recorded experiment (``COURSE_EXPERIMENT_WORKER=1``).

    Run the same ``python -m course_lib.experiments NAME`` command once plainly and once or more with
    this variable set: the processes share the runs through the run cache (each claims a run before it
    starts it), the workers exit when no run is left, and only the plain process writes the record.
    """
    return os.environ.get(WORKER_ENV, "") not in ("", "0")



class RunCache:
    """Finished runs of a long experiment, one JSON line each: an interrupted record resumes, and several
    processes can share the runs (see :func:`is_worker`).

    A run is found again only under the same key: the sizes that shape a run, the run's own settings
    and :data:`RUN_CODE_VERSION`. Each run also keeps the git commit it was computed at. A process
    claims a run with a lock file holding its pid before it starts it; a lock whose process is gone
    is taken over.
    """

    def __init__(self, name: str, profile_name: str, sizes: Mapping[str, Any], enabled: bool = True,
                 root: Any = None) -> None:
        from pathlib import Path

        from course_lib.tools.assets import cache_dir

        shaping = {k: v for k, v in sizes.items() if k not in _NOT_IN_RUN_KEY}
        self.base = dict(sizes=json_ready(shaping), code=RUN_CODE_VERSION)
        folder = Path(root) if root is not None else cache_dir() / "experiments"
        self.path = folder / f"{name}_{profile_name}.jsonl" if enabled else None
        self.locks = folder / f"{name}_{profile_name}.locks" if enabled else None
        self.done: dict[str, Any] = {}
        self._read = 0
        self.reload()

    def key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps({**self.base, **json_ready(settings)}, sort_keys=True)

    def reload(self) -> None:
        """Read the runs other processes finished since the last look."""
        if self.path is None or not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self._read)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next look
        self._read += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                entry = json.loads(line)
                self.done[entry["key"]] = entry["value"]

    def _lock(self, key: str):
        import hashlib

        return self.locks / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")

    def _claim(self, key: str) -> bool:
        if self.locks is None:
            return True
        self.locks.mkdir(parents=True, exist_ok=True)
        lock = self._lock(key)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text() or 0)
                    os.kill(pid, 0)
                    return False  # its process is alive and computing it
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    lock.unlink(missing_ok=True)  # its process died: take it over
                    continue
                except PermissionError:
                    return False
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def _compute(self, key: str, compute) -> Any:
        from course_lib.tools.profiles import code_version

        try:
            value = json_ready({**compute(), "commit": code_version(), "load_average_1min": run_load()})
            self.done[key] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "value": value}) + "\n")
        finally:
            if self.locks is not None:
                self._lock(key).unlink(missing_ok=True)
        return value

    def has(self, settings: Mapping[str, Any]) -> bool:
        return self.key(settings) in self.done

    def work_on_one(self, items: Sequence[tuple[Mapping[str, Any], Any]]) -> bool:
        """Compute the first of ``items`` that is neither finished nor claimed; False if there is none."""
        self.reload()
        for settings, compute in items:
            key = self.key(settings)
            if key not in self.done and self._claim(key):
                self._compute(key, compute)
                return True
        return False

    def get_many(self, items: Sequence[tuple[Mapping[str, Any], Any]], poll_seconds: float = 15.0) -> list[Any]:
        """The values of all ``(settings, compute)`` runs: first every unclaimed one is computed here,
        then the ones other processes are computing are waited for."""
        keys = [self.key(settings) for settings, _ in items]
        while True:
            if self.work_on_one(items):   # an unclaimed run, or one whose process died
                continue
            if all(key in self.done for key in keys):
                return [self.done[key] for key in keys]
            time.sleep(poll_seconds)      # the rest are being computed by other processes

    def get(self, settings: Mapping[str, Any], compute) -> Any:
        return self.get_many([(settings, compute)])[0]



def json_ready(value: Any) -> Any:
    """``value`` with tuples as lists, numpy numbers as Python numbers (what JSON can hold)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value



def bits(flags: Any) -> str:
    return "".join("1" if f else "0" for f in np.asarray(flags).astype(bool))



def unbits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")



def log(name: str, message: str) -> None:
    print(f"[{name}] {time.strftime('%H:%M:%S')} {message}", flush=True)
