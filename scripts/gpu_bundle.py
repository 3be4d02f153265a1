"""Carry what the GPU record needs to a machine with no network, in pieces of at most ~60 MiB.

The GPU machine (see issue 16 and scripts/gpu_record.sh) lacks a few packages and the course's assets, and
each call to it carries at most 64 MiB, the repository included. So:

    python scripts/gpu_bundle.py pack lora_causal_lm      # here: wheels into .whl/, assets cut into parts
                                                          # under .gpu-transfer-1/, .gpu-transfer-2/, ...
    python scripts/gpu_bundle.py unpack                   # there (gpu_record.sh does it): reassemble the
                                                          # parts present, check SHA-256, extract into the cache

Each ``.gpu-transfer-N`` folder is one call's load: carry ``.gpu-transfer-1`` (and ``.whl``) in the first
call, ``.gpu-transfer-2`` in the next; folders from earlier calls stay on a warm machine. An asset is
extracted only once all its parts are there and their concatenation has the SHA-256 written at packing;
the cache's own manifest then verifies every file again when the course loads it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PART_MIB = 28  # two parts per call fit beside the repository and the wheels
# What each record needs: course assets (cache folders) and wheels missing on the GPU machine.
NEEDS = {
    "bench": ((), ()),
    "lora_causal_lm": (("smollm2-135m-instruct", "vader-corpora"),
                       ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "gguf==0.19.0")),
    "finetuning": (("minilm-l6-v2", "vader-corpora"),
                   ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "vaderSentiment==3.3.2")),
    "lora": (("minilm-l6-v2", "vader-corpora"), ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")),
    "scaling": ((), ()),
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(parts: list[str], *, part_mib: int = PART_MIB) -> list[Path]:
    sys.path.insert(0, str(REPO))
    from course_lib.tools import assets

    names = sorted({a for p in parts for a in NEEDS[p][0]})
    wheels = sorted({w for p in parts for w in NEEDS[p][1]})
    written: list[Path] = []
    if wheels:
        target = REPO / ".whl"
        target.mkdir(exist_ok=True)
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(target),
                        *wheels], check=True)
        written += sorted(target.glob("*.whl"))
    chunks: list[tuple[str, int, bytes]] = []
    index: dict[str, dict] = {}
    for name in names:
        folder = assets.fetch(name)  # verified against its manifest, or fetched
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(folder, arcname=str(folder.relative_to(assets.cache_dir())))
        data = buffer.getvalue()
        size = part_mib * 2**20
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        index[name] = {"sha256": _sha256(data), "parts": len(pieces)}
        chunks += [(name, k, piece) for k, piece in enumerate(pieces)]
    calls = [chunks[i:i + 2] for i in range(0, len(chunks), 2)]  # two parts per call
    for number, load in enumerate(calls, start=1):
        folder = REPO / f".gpu-transfer-{number}"
        folder.mkdir(exist_ok=True)
        for name, k, piece in load:
            path = folder / f"{name}.tar.part{k:02d}"
            path.write_bytes(piece)
            written.append(path)
        (folder / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(calls)} call(s): carry .whl and .gpu-transfer-1 first" if calls else "no assets needed")
    return written


def unpack(roots: list[Path] | None = None, cache: Path | None = None) -> list[str]:
    """Reassemble and extract every asset whose parts are all present; returns the names extracted."""
    roots = roots or sorted(REPO.glob(".gpu-transfer*"))
    if cache is None:
        sys.path.insert(0, str(REPO))
        from course_lib.tools import assets

        cache = assets.cache_dir()
    index: dict[str, dict] = {}
    parts: dict[str, dict[int, Path]] = {}
    for root in roots:
        if (root / "index.json").is_file():
            index.update(json.loads((root / "index.json").read_text()))
        for path in root.glob("*.tar.part*"):
            name, number = path.name.split(".tar.part")
            parts.setdefault(name, {})[int(number)] = path
    done = []
    for name, entry in index.items():
        have = parts.get(name, {})
        if len(have) != entry["parts"]:
            print(f"{name}: {len(have)} of {entry['parts']} parts here; carry the rest, then unpack again")
            continue
        data = b"".join(have[k].read_bytes() for k in range(entry["parts"]))
        if _sha256(data) != entry["sha256"]:
            raise SystemExit(f"error: the parts of {name} do not reassemble to the packed archive (SHA-256 "
                             f"differs): carry them again.")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                target = Path(member.name)
                if target.is_absolute() or ".." in target.parts or not (member.isfile() or member.isdir()):
                    raise SystemExit(f"error: refusing to extract {member.name!r} from {name}'s parts.")
            tar.extractall(cache, filter="data")
        done.append(name)
        print(f"{name}: extracted into {cache}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("parts", nargs="+", choices=sorted(NEEDS))
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    u = sub.add_parser("unpack")
    u.add_argument("roots", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.parts, part_mib=args.part_mib)
    else:
        roots = [r for r in args.roots if r.is_dir()] or None
        unpack(roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
