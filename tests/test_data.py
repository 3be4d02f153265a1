"""course_lib.tools.data: the loaders give the documented columns, splits and counts (see data/README.md)."""

import pytest

from course_lib.tools.data import (NEUTRAL_THRESHOLD, SENTIMENT_FILES, VALIDATION_WORKS, load_sentiment, load_shakespeare,
                             shakespeare_files, shakespeare_split, train_bpe)


@pytest.fixture(scope="module")
def movies():
    return load_sentiment("movies")


def test_sentiment_splits_columns_and_counts(movies):
    assert set(movies) == {"train", "validation", "test"}
    assert movies["train"].column_names == ["text", "label", "rating"]
    assert movies["train"].features["label"].names == ["negative", "positive"]
    sizes = {split: len(ds) for split, ds in movies.items()}
    assert sizes == {"train": 8057, "validation": 1007, "test": 1008}  # the datasheet's numbers


def test_labels_follow_ratings_and_neutral_snippets_are_dropped(movies):
    for split in movies.values():
        ratings, labels = split["rating"], split["label"]
        assert all(abs(r) >= NEUTRAL_THRESHOLD for r in ratings)
        assert all(label == int(r > 0) for r, label in zip(ratings, labels))


def test_split_is_stratified_disjoint_and_repeatable(movies):
    fractions = [sum(split["label"]) / len(split) for split in movies.values()]
    assert max(fractions) - min(fractions) < 0.01
    texts = [set(split["text"]) for split in movies.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    again = load_sentiment("movies")
    assert again["test"]["text"] == movies["test"]["text"]


def test_other_domains_and_bad_arguments():
    sizes = {domain: sum(len(s) for s in load_sentiment(domain).values()) for domain in SENTIMENT_FILES}
    assert sizes == {"movies": 10072, "tweets": 3432, "amazon": 2985, "nyt": 2970}
    with pytest.raises(ValueError, match="Unknown sentiment domain 'books'"):
        load_sentiment("books")
    with pytest.raises(ValueError, match="neutral_threshold"):
        load_sentiment("movies", neutral_threshold=5)


def test_shakespeare_has_one_edition_per_work():
    corpus = load_shakespeare()
    assert corpus.column_names == ["work", "title", "text"]
    assert len(corpus) == 42
    works = corpus["work"]
    assert len(set(works)) == len(works)
    assert "hamlet" in works and not any(w.endswith("_f") for w in works)
    titles = dict(zip(corpus["work"], corpus["title"]))
    assert titles["hamlet"].lower().startswith("hamlet")
    # each row is exactly its file: the builder kept the order of the files
    for (work, _, path), text in zip(shakespeare_files(), corpus["text"]):
        assert text == path.read_text(encoding="utf-8"), work
    assert 4_900_000 < sum(len(t) for t in corpus["text"]) < 5_200_000


def test_shakespeare_split_is_by_work():
    train, val = shakespeare_split()
    corpus = load_shakespeare()
    texts = dict(zip(corpus["work"], corpus["text"]))
    for work in VALIDATION_WORKS:
        assert texts[work] in val and texts[work] not in train
    assert texts["hamlet"] in train and texts["hamlet"] not in val
    assert len(train) + len(val) == sum(len(t) for t in corpus["text"]) + 2 * (len(corpus) - 2)
    with pytest.raises(ValueError, match="unknown work.*'hamlett'"):
        shakespeare_split(["hamlett"])


def test_train_bpe_round_trips_and_compresses_like_the_reference_trainer():
    from tokenizers import ByteLevelBPETokenizer

    text = "To be, or not to be, that is the question. " * 200 + "Whether 'tis nobler in the mind to suffer. " * 200
    ours = train_bpe(text, 300)
    assert ours.get_vocab_size() == 300
    for line in ["To be, or not to be", "Ünïcödé & symbols ☃", "   spaces  "]:
        assert ours.decode(ours.encode(line).ids) == line
    # tokenizers' own byte-level BPE implementation, trained the same way, compresses the same text alike
    reference = ByteLevelBPETokenizer(add_prefix_space=False)
    reference.train_from_iterator([text], vocab_size=300, min_frequency=2, show_progress=False)
    sample = "To be, or not to be, that is the question."
    assert len(ours.encode(sample).ids) < len(sample) / 2
    assert abs(len(ours.encode(sample).ids) - len(reference.encode(sample).ids)) <= 3
    with pytest.raises(ValueError, match="256 byte symbols"):
        train_bpe(text, 100)
