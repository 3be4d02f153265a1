"""course_lib.parts.bpe: exact round trips, the same merges as a plain full-recount BPE, and `tokenizers` agrees.

The independent references: a deliberately naive trainer written here (recount every pair after every
merge), and Hugging Face `tokenizers` (its ByteLevel pre-tokenizer and BPE model), which is handed our
merges and must then cut every text into exactly our tokens.
"""

import json
import random
from collections import Counter

import pytest
import regex

from course_lib.parts.bpe import GPT2_PATTERN, BPETokenizer, merge_pair

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
        "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n") * 3


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(TEXT, 340)


def naive_train(text, vocab_size):
    """BPE as first written down: recount all pairs after every merge; ties to the smaller pair."""
    words = Counter(regex.findall(GPT2_PATTERN, text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    while 256 + len(merges) < vocab_size:
        counts = Counter()
        for w, f in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                counts[pair] += f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = {w: merge_pair(s, best, 255 + len(merges)) for w, s in seqs.items()}
    return merges


def bytes_to_unicode():
    """GPT-2's printable stand-ins for the 256 bytes (how `tokenizers` spells byte-level tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def as_hf_tokenizer(ours):
    """A `tokenizers` byte-level BPE holding exactly our vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    spell = ["".join(b2u[b] for b in token) for token in ours.vocab]
    vocab = {s: i for i, s in enumerate(spell)}
    merges = [(spell[a], spell[b]) for a, b in ours.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_merge_pair_goes_left_to_right_without_overlaps():
    assert merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]
    assert merge_pair([5, 5, 5, 5], (5, 5), 9) == [9, 9]
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 7) == [7, 3, 7]
    assert merge_pair([1], (1, 2), 7) == [1] and merge_pair([], (1, 2), 7) == []


def test_training_equals_the_naive_full_recount(tok):
    assert tok.merges == naive_train(TEXT, 340)
    assert tok.vocab_size == 340 and len(tok.vocab) == 340
    for i, (a, b) in enumerate(tok.merges):
        assert a < 256 + i and b < 256 + i                                # merges use earlier ids only
        assert tok.vocab[256 + i] == tok.vocab[a] + tok.vocab[b]
    assert tok.merge_counts == sorted(tok.merge_counts, reverse=True)      # the best count never grows
    n_bytes = sum(len(w.encode()) for w in regex.findall(GPT2_PATTERN, TEXT))
    assert tok.train_tokens[-1] == len(tok.encode(TEXT)) < n_bytes


def test_round_trip_is_exact_for_any_string(tok):
    samples = ["", " ", "\n\n", "To be, or not to be", "  leading and trailing  ", "naïve café", "莎士比亚的戏剧",
               "emoji 🤖🎭 and ZWJ 👩‍👩‍👧", "control \x00\x01\x7f\t\r\x1b[0m", "lone surrogate \ud800 here",
               "Ünïcödé ☃ " * 50, "'s 've 're 'll 123 4567 ..."]
    rng = random.Random(0)
    for _ in range(200):                                                   # random code points, any plane
        samples.append("".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800),
                                               rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)]))
                               for _ in range(rng.randrange(1, 30))))
    for text in samples:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_pretokens_match_tokenizers_bytelevel():
    from tokenizers import pre_tokenizers

    u2b = {u: b for b, u in bytes_to_unicode().items()}
    text = TEXT + " numbers 12345 and  double  spaces\n\n\tand 'tis, isn't it? 莎士比亚 🤖!!"
    theirs = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    theirs = [bytes(u2b[c] for c in piece).decode("utf-8") for piece, _ in theirs]
    assert regex.findall(GPT2_PATTERN, text) == theirs


def test_encoding_equals_tokenizers_with_the_same_merges(tok):
    hf = as_hf_tokenizer(tok)
    for text in [TEXT, "Whether 'tis nobler, unseen words: quixotic zephyrs 42!", "莎士比亚 🤖\n\n  x"]:
        assert tok.encode(text) == hf.encode(text).ids
        assert hf.decode(tok.encode(text)) == text


def test_truncated_is_training_to_the_smaller_vocabulary(tok):
    small = tok.truncated(300)
    assert small.merges == BPETokenizer.train(TEXT, 300).merges
    assert small.vocab_size == 300
    assert len(small.encode(TEXT)) > len(tok.encode(TEXT))


def test_compression_and_speed_agree_with_tokenizers_on_shakespeare():
    """One fifth of the training plays, held-out plays for compression (the lesson uses all of it)."""
    import time

    from course_lib.tools.data import shakespeare_split, train_bpe

    train, val = shakespeare_split()
    train, val = train[:1_000_000], val[:200_000]
    start = time.perf_counter()
    ours = BPETokenizer.train(train, 1024)
    seconds = time.perf_counter() - start
    theirs = train_bpe(train, 1024)
    ours_rate = len(ours.encode(val)) / len(val)
    theirs_rate = len(theirs.encode(val).ids) / len(val)
    assert abs(ours_rate / theirs_rate - 1) < 0.02, (ours_rate, theirs_rate)
    assert ours.decode(ours.encode(val)) == val
    assert seconds < 30, f"training took {seconds:.0f} s; the pair counts should be updated incrementally"
    b2u = bytes_to_unicode()
    spelled = {tuple("".join(b2u[b] for b in ours.vocab[i]) for i in pair) for pair in ours.merges}
    their_merges = {tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                    for m in json.loads(theirs.to_str())["model"]["merges"]}
    assert len(spelled & their_merges) > 0.9 * len(spelled)               # mostly the same merges


def test_bad_input_gets_one_clear_sentence(tok):
    with pytest.raises(ValueError, match="counts the 256 byte symbols"):
        BPETokenizer.train(TEXT, 100)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        BPETokenizer.train(TEXT, 300.0)
    with pytest.raises(TypeError, match="decode bytes first"):
        BPETokenizer.train(TEXT.encode(), 300)
    with pytest.raises(TypeError, match="encode expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="not a token id"):
        tok.decode([65, 340])
    with pytest.raises(ValueError, match="merges must refer to earlier ids"):
        BPETokenizer([(256, 1)])
    with pytest.raises(ValueError, match="256..340"):
        tok.truncated(500)
    assert tok.decode([0xC3]) == "\ufffd"                                # the first half of "é"
    assert BPETokenizer.train("ab", 1000).vocab_size == 257               # stops when nothing is left to merge


def test_byte_symbols_spell_tokens_as_tokenizers_does(tok):
    from course_lib.parts.bpe import byte_symbols, hf_vocab_bytes

    assert byte_symbols() == bytes_to_unicode() and byte_symbols()[ord(" ")] == "Ġ"
    hf = as_hf_tokenizer(tok)
    assert hf_vocab_bytes(hf) == tok.vocab
