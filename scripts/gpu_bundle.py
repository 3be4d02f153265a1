"""Carry what the GPU record needs to a machine with no network, in pieces of at most ~60 MiB.

The GPU machine (see issue 16 and scripts/gpu_record.sh) lacks a few packages and the course's assets, and
each call to it carries at most 64 MiB, the repository included. So:

    python scripts/gpu_bundle.py pack lora_causal_lm      # here: wheels into .whl/, assets cut into parts
                                                          # under .gpu-transfer-1/, .gpu-transfer-2/, ...
    python scripts/gpu_bundle.py install                  # there (gpu_record.sh does it): the wheels, each
                                                          # checked against its pinned SHA-256
    python scripts/gpu_bundle.py unpack                   # there (gpu_record.sh does it): reassemble the
                                                          # parts present, check them, extract into the cache

Each ``.gpu-transfer-N`` folder is one call's load: carry ``.gpu-transfer-1`` (and ``.whl``) in the first
call, ``.gpu-transfer-2`` in the next; folders from earlier calls stay on a warm machine.

What arrives is trusted only as far as the pins in the repository vouch for it: every wheel must have the
SHA-256 pinned in ``WHEELS`` (pip downloads and installs them with ``--require-hashes``), and an asset is
extracted only once all its parts are there, their concatenation has the SHA-256 the index recorded at
packing (a check of the transfer), every member lies inside the asset's own cache folder, and the files
match the asset's pins in course_lib.tools.assets (which the bundle cannot change). It is moved into the
cache in one rename.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PART_MIB = 28  # two parts per call fit beside the repository and the wheels
# The wheels the GPU machine lacks, each pinned by version and by the SHA-256 of the one file pip picks for
# CPython 3.12 on x86-64 Linux (checked against PyPI's simple API).
WHEELS = {
    "datasets==5.2.0": "4be9e2882caaf5db13eadc39e93f3da2a995187b99acebac1595bf6c58dfa927",
    "dill==0.4.1": "1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d",
    "multiprocess==0.70.19": "3a56c0e85dd5025161bac5ce138dcac1e49174c7d8e74596537e729fd5c53c28",
    "gguf==0.19.0": "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd",
    "vaderSentiment==3.3.2": "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311",
}
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


def _assets():
    sys.path.insert(0, str(REPO))
    from course_lib.tools import assets

    return assets


def _requirements(specs: list[str], path: Path) -> Path:
    """A requirements file pinning each of ``specs`` by its SHA-256 (what pip's --require-hashes reads)."""
    path.write_text("".join(f"{spec} --hash=sha256:{WHEELS[spec]}\n" for spec in sorted(specs)))
    return path


def pack(parts: list[str], *, part_mib: int = PART_MIB, root: Path = REPO) -> list[Path]:
    assets = _assets()
    names = sorted({a for p in parts for a in NEEDS[p][0]})
    wheels = sorted({w for p in parts for w in NEEDS[p][1]})
    written: list[Path] = []
    if wheels:
        target = root / ".whl"
        target.mkdir(exist_ok=True)
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        with tempfile.TemporaryDirectory() as scratch:
            pinned = _requirements(wheels, Path(scratch) / "wheels.txt")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--require-hashes", "--python-version", "3.12", "--implementation", "cp",
                            *platform_args, "-d", str(target), "-r", str(pinned)], check=True)
        written += sorted(target.glob("*.whl"))
    chunks: list[tuple[str, int, bytes]] = []
    index: dict[str, dict] = {}
    for name in names:
        folder = assets.fetch(name)  # verified against its pins, or fetched
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
        folder = root / f".gpu-transfer-{number}"
        folder.mkdir(exist_ok=True)
        for name, k, piece in load:
            path = folder / f"{name}.tar.part{k:02d}"
            path.write_bytes(piece)
            written.append(path)
        (folder / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(calls)} call(s): carry .whl and .gpu-transfer-1 first" if calls else "no assets needed")
    return written


def _spec_of(wheel: Path) -> str | None:
    """The pinned spec a wheel file is a build of (its name and version, as a wheel file name spells them)."""
    name, _, rest = wheel.name.partition("-")
    version = rest.partition("-")[0]
    for spec in WHEELS:
        pinned_name, _, pinned_version = spec.partition("==")
        if pinned_name.lower().replace("-", "_") == name.lower() and pinned_version == version:
            return spec
    return None


def install(root: Path = REPO, target: Path = Path("/tmp/course-site")) -> list[str]:
    """Install the wheels in ``root/.whl`` into ``target``, each only if it has its pinned SHA-256 (checked
    here, then again by pip's --require-hashes against a requirements file written from ``WHEELS``, never
    from what was carried). Returns the specs installed."""
    wheels = sorted((root / ".whl").glob("*.whl"))
    specs = []
    for wheel in wheels:
        spec = _spec_of(wheel)
        if spec is None:
            raise SystemExit(f"error: {wheel.name} in .whl is not a wheel gpu_bundle.py pins: remove it and pack "
                             f"again.")
        if _sha256(wheel.read_bytes()) != WHEELS[spec]:
            raise SystemExit(f"error: {wheel.name} does not have the SHA-256 pinned for {spec}: carry the wheels "
                             f"that `python scripts/gpu_bundle.py pack` downloads.")
        specs.append(spec)
    if specs:
        with tempfile.TemporaryDirectory() as scratch:
            pinned = _requirements(specs, Path(scratch) / "wheels.txt")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--require-hashes", "--find-links", str(root / ".whl"),
                            "--target", str(target), "-r", str(pinned)], check=True)
    return specs


def _members_problem(tar: tarfile.TarFile, folder: str) -> str | None:
    """A member that is not a plain file or folder inside ``folder`` (the asset's own cache folder)."""
    for member in tar.getmembers():
        target = Path(member.name)
        inside = target.parts[:len(Path(folder).parts)] == Path(folder).parts
        if target.is_absolute() or ".." in target.parts or not inside or not (member.isfile() or member.isdir()):
            return member.name
    return None


def _extract(name: str, data: bytes, cache: Path) -> None:
    """Extract the reassembled archive of asset ``name`` into a staging folder, check it against the
    asset's pins, then move it into the cache in one rename."""
    assets = _assets()
    if name not in assets.ASSETS:
        raise SystemExit(f"error: the parts name {name!r}, which is not a course asset: carry parts made by pack.")
    relative = assets.asset_dir(name).relative_to(assets.cache_dir()).as_posix()
    final = cache / relative
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        bad = _members_problem(tar, relative)
        if bad is not None:
            raise SystemExit(f"error: refusing to extract {bad!r} from {name}'s parts: only files inside "
                             f"{relative}/ may be there.")
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.unpack-") as work:
            tar.extractall(work, filter="data")
            staged = Path(work) / relative
            problem = assets.folder_problem(name, staged)
            if problem is not None:
                raise SystemExit(f"error: the parts of {name} do not hold the pinned asset ({problem}): pack them "
                                 f"again from a verified cache.")
            if final.exists():
                shutil.rmtree(final.rename(Path(work) / "stale"))
            staged.rename(final)


def unpack(roots: list[Path] | None = None, cache: Path | None = None) -> list[str]:
    """Reassemble and extract every asset whose parts are all present; returns the names extracted."""
    roots = roots or sorted(REPO.glob(".gpu-transfer*"))
    cache = _assets().cache_dir() if cache is None else cache
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
        _extract(name, data, cache)
        done.append(name)
        print(f"{name}: extracted into {cache}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("parts", nargs="+", choices=sorted(NEEDS))
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    i = sub.add_parser("install")
    i.add_argument("--target", type=Path, default=Path("/tmp/course-site"))
    u = sub.add_parser("unpack")
    u.add_argument("roots", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.parts, part_mib=args.part_mib)
    elif args.command == "install":
        install(target=args.target)
    else:
        roots = [r for r in args.roots if r.is_dir()] or None
        unpack(roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
