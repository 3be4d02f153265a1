"""The course's corpora as ``datasets`` objects, built from the fetched assets with ``datasets``' own
builders (``csv``, ``text``) on local files.

Explained in notebooks/00_setup.ipynb; used by 04 (Shakespeare), 06-09 (sentiment). The datasheet with
sources, licences and the counts these loaders produce is data/README.md.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Any

from course_lib.tools.assets import cache_dir, fetch

# The VADER ground truth: one file per domain, lines "id<TAB>mean rating<TAB>text".
SENTIMENT_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}

# Ratings are the mean of 20 raters on -4..+4. Snippets whose mean lies within this distance of 0 are
# ambiguous (raters disagree or found them neutral) and are dropped rather than forced into a class.
NEUTRAL_THRESHOLD = 0.5
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test


def _datasets_cache() -> str:
    """Keep the Arrow files ``datasets`` writes inside the course cache, not in the home folder."""
    path = cache_dir() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _quiet_datasets() -> None:
    # Local builders only: nothing may reach the Hub, and a progress bar per tiny file is noise.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()


def load_sentiment(domain: str = "movies", *, neutral_threshold: float = NEUTRAL_THRESHOLD,
                   seed: int = SPLIT_SEED):
    """The VADER sentiment snippets of one domain as a ``DatasetDict`` (train / validation / test).

    Columns: ``text``; ``label`` (0 negative, 1 positive; a ``ClassLabel``); ``rating`` (the mean
    human rating, -4..+4). Snippets with ``|rating| < neutral_threshold`` are dropped as ambiguous.
    The 80/10/10 split is stratified by label with a fixed seed, so every run gets the same split.
    """
    if domain not in SENTIMENT_FILES:
        raise ValueError(f"Unknown sentiment domain {domain!r}: choose one of {', '.join(SENTIMENT_FILES)}.")
    if not 0 <= neutral_threshold < 4:
        raise ValueError(f"neutral_threshold must lie in [0, 4) (ratings are -4..+4), got {neutral_threshold}.")
    _quiet_datasets()
    import datasets

    path = fetch("vader-corpora") / SENTIMENT_FILES[domain]
    raw = datasets.load_dataset(
        "csv", data_files=str(path), split="train", cache_dir=_datasets_cache(),
        sep="\t", header=None, column_names=["id", "rating", "text"], quoting=3,  # 3: QUOTE_NONE
        features=datasets.Features({"id": datasets.Value("string"), "rating": datasets.Value("float64"),
                                    "text": datasets.Value("string")}),
        keep_default_na=False, encoding="utf-8",
        encoding_errors="replace")
    raw = raw.filter(lambda row: abs(row["rating"]) >= neutral_threshold and row["text"].strip() != "")
    labelled = raw.map(lambda row: {"text": row["text"].strip(), "label": int(row["rating"] > 0)},
                       remove_columns=["id"])
    labelled = labelled.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
    labelled = labelled.select_columns(["text", "label", "rating"])
    train_fraction, validation_fraction, test_fraction = SPLIT_FRACTIONS
    first = labelled.train_test_split(test_size=validation_fraction + test_fraction, seed=seed,
                                      stratify_by_column="label")
    second = first["test"].train_test_split(
        test_size=test_fraction / (validation_fraction + test_fraction), seed=seed, stratify_by_column="label")
    return datasets.DatasetDict(train=first["train"], validation=second["train"], test=second["test"])


def shakespeare_files() -> list[tuple[str, str, Path]]:
    """(work, title, path) of one edition per work: the modern-spelling Gutenberg text.

    The package ships most plays twice: a modern edition (``*_gut.txt``) and the First Folio spelling
    (``*_gut_f.txt``, under names that differ: ``comedy_of_errours``, ``twelfe-night`` …). Every work has
    a modern edition, so de-duplicating means keeping exactly the ``*_gut.txt`` files.
    """
    folder = fetch("shakespeare")
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(folder / "metadata.txt", encoding="utf-8")
    works = []
    for path in sorted(folder.glob("*_gut.txt")):
        work = path.stem[: -len("_gut")]
        title = metadata.get(path.stem, "title", fallback=work.replace("_", " ").title())
        works.append((work, title.strip(), path))
    return works


def load_shakespeare():
    """The de-duplicated works of Shakespeare as a ``datasets.Dataset``, one row per work.

    Columns: ``work`` (a short id such as ``hamlet``), ``title``, ``text`` (the whole work).
    """
    _quiet_datasets()
    import datasets

    works = shakespeare_files()
    corpus = datasets.load_dataset("text", data_files=[str(path) for _, _, path in works], split="train",
                                   sample_by="document", keep_linebreaks=True, cache_dir=_datasets_cache())
    if len(corpus) != len(works):
        raise RuntimeError(f"expected one document per file ({len(works)}), got {len(corpus)} rows.")
    corpus = corpus.add_column("work", [work for work, _, _ in works])
    corpus = corpus.add_column("title", [title for _, title, _ in works])
    return corpus.select_columns(["work", "title", "text"])


# Four plays held out whole, so validation text was never seen in any form (notebook 04 explains why).
VALIDATION_WORKS = ("julius_caesar", "macbeth", "tempest", "twelfth_night")


def shakespeare_split(validation_works=VALIDATION_WORKS) -> tuple[str, str]:
    """(train text, validation text): the works joined by blank lines, split by work, not by line."""
    works = load_shakespeare()
    unknown = set(validation_works) - set(works["work"])
    if unknown:
        raise ValueError(f"unknown work(s) {sorted(unknown)}; the works are: {', '.join(works['work'])}.")
    train = works.filter(lambda row: row["work"] not in validation_works)
    val = works.filter(lambda row: row["work"] in validation_works)
    return "\n\n".join(train["text"]), "\n\n".join(val["text"])


def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``text``: 256 byte symbols plus merges.

    Notebook 04 builds the same algorithm from scratch (``course_lib.parts.bpe``) and compares the two;
    notebook 05 uses this one for the Shakespeare sweep.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols a byte-level BPE starts from.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # bytes; 'Ġ' marks a space
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # chunks of 10k characters: the trainer counts words per chunk, and one huge string is slow
    tokenizer.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    return tokenizer


def take(data: Any, n: int | None, seed: int = 0) -> Any:
    """The first ``n`` examples of a fixed shuffle of ``data`` (all of it when ``n`` is None or too big).

    Seed s of a recorded experiment trains on ``take(train, n, seed=s)``: every method of that seed sees
    the same labelled examples, and a smaller ``n`` is a subset of a larger one.
    """
    return data if n is None or n >= len(data) else data.shuffle(seed=seed).select(range(n))
