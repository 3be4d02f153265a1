"""Byte-level byte-pair encoding (BPE) from scratch: train, encode, decode.

Explained in notebooks/04_training_a_language_model.ipynb ("Byte-level BPE from scratch"); the lesson
then keeps using Hugging Face ``tokenizers`` (``course_lib.tools.data.train_bpe``), which is faster.

BPE (Sennrich et al. 2016, Sec. 3.2) starts from a base alphabet and repeatedly merges the most
frequent adjacent pair of symbols into a new symbol. GPT-2 (Radford et al. 2019, Sec. 2.2) runs it on
**bytes**: the base alphabet is the 256 byte values, so every string has an encoding (its UTF-8
bytes) and nothing is ever "unknown". Before counting, the text is cut into pre-tokens with a regular
expression that keeps letters, digits and punctuation apart and attaches a leading space to the
word after it (" the", not " " + "the"); pairs are never counted across two pre-tokens, so a merge
never glues the end of one word to the start of the next.

    tok = BPETokenizer.train(text, vocab_size=1024)     # 256 bytes + 768 merges
    ids = tok.encode("To be, or not to be")             # list[int]
    tok.decode(ids)                                     # "To be, or not to be", exactly

Training counts each distinct pre-token once, weighted by how often it occurs, and keeps the pair
counts up to date after every merge: only the pre-tokens that contain the merged pair are touched
(an index maps each pair to them), instead of recounting the whole corpus for each merge.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex

__all__ = ["GPT2_PATTERN", "BPETokenizer", "merge_pair", "byte_symbols", "hf_vocab_bytes"]

# GPT-2's pre-tokeniser (Radford et al. 2019; the pattern of its released encoder, which
# ``tokenizers``' ByteLevel pre-tokenizer also uses): common English contractions; an optional
# space followed by letters, by digits, or by other non-space characters; runs of white space
# (the last space of a run is left for the word after it).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Lone surrogates (e.g. "\ud800") are Python strings that plain UTF-8 refuses; "surrogatepass"
# encodes them as 3 bytes each, so every Python string round-trips.
_ERRORS = "surrogatepass"


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, left to right, without overlaps.

    ``merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]``: after a merge the scan jumps past both symbols.
    """
    out: list[int] = []
    i, n = 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, which ``tokenizers`` uses to spell byte-level tokens.

    Bytes that are printable characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 (controls, the space, …) get the characters 256, 257, … in byte order, so a space is ``Ġ``.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def hf_vocab_bytes(tokenizer) -> list[bytes]:
    """The vocabulary of a byte-level ``tokenizers.Tokenizer`` as bytes, indexed by token id."""
    to_byte = {c: b for b, c in byte_symbols().items()}
    vocab = tokenizer.get_vocab()
    out = [b""] * len(vocab)
    for token, i in vocab.items():
        out[i] = bytes(to_byte[c] for c in token)
    return out


class BPETokenizer:
    """A byte-level BPE tokenizer: 256 byte symbols plus ``merges`` (id 256 + i is merge i)."""

    def __init__(self, merges: Iterable[tuple[int, int]] = (), pattern: str = GPT2_PATTERN) -> None:
        self.merges: list[tuple[int, int]] = []
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]      # id -> the bytes it stands for
        for merge in merges:
            try:
                a, b = (operator.index(x) for x in merge)
            except (TypeError, ValueError):
                raise ValueError(f"merge {len(self.merges)} is {merge!r}, but each merge is a pair of token ids "
                                 f"(a, b).") from None
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise ValueError(f"merge {len(self.merges)} joins ids ({a}, {b}), but only ids below "
                                 f"{len(self.vocab)} exist at that point; merges must refer to earlier ids.")
            self.merges.append((int(a), int(b)))
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.pattern = pattern
        self._regex = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}
        # filled by train(): the pair's count when it was merged, and the training text's length in
        # tokens after each merge (for the picture of the vocabulary growing)
        self.merge_counts: list[int] = []
        self.train_tokens: list[int] = []

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}: 256 bytes + {len(self.merges)} merges)"

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, *, pattern: str = GPT2_PATTERN) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``text``; ties go to the smaller pair of ids.

        Stops early (with a smaller vocabulary) if no adjacent pair is left to merge.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, but it is a {type(text).__name__}; decode bytes first.")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (it counts the 256 byte symbols), but it is "
                             f"{vocab_size!r}.")
        chunks = Counter(regex.findall(pattern, text))
        words = [list(chunk.encode("utf-8", _ERRORS)) for chunk in chunks]
        freqs = list(chunks.values())

        # pair -> its count over the corpus, and pair -> the words it (may) occur in
        counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, f) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                counts[pair] += f
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in counts.items()]                  # most frequent first
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        merge_counts: list[int] = []
        n_tokens = sum(len(word) * f for word, f in zip(words, freqs))
        train_tokens: list[int] = []
        while 256 + len(merges) < vocab_size:
            while heap and (counts.get(heap[0][1], 0) != -heap[0][0] or heap[0][0] == 0):
                heapq.heappop(heap)                                        # stale entry: count changed
            if not heap:
                break
            count, pair = -heap[0][0], heap[0][1]
            new_id = 256 + len(merges)
            merges.append(pair)
            merge_counts.append(count)
            touched: set[tuple[int, int]] = set()
            for w in where.pop(pair):
                word, f = words[w], freqs[w]
                merged = merge_pair(word, pair, new_id)
                if len(merged) == len(word):
                    continue                                               # the pair left this word earlier
                # the incremental update: take this word's old pairs out, put its new pairs in
                for p in zip(word, word[1:]):
                    counts[p] -= f
                    touched.add(p)
                for p in zip(merged, merged[1:]):
                    counts[p] += f
                    where[p].add(w)
                    touched.add(p)
                n_tokens -= (len(word) - len(merged)) * f
                words[w] = merged
            for p in touched:
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
                else:
                    del counts[p]
            train_tokens.append(n_tokens)
        tokenizer = cls(merges, pattern)
        tokenizer.merge_counts, tokenizer.train_tokens = merge_counts, train_tokens
        return tokenizer

    def truncated(self, vocab_size: int) -> BPETokenizer:
        """The tokenizer with only the first ``vocab_size - 256`` merges.

        Training is greedy, so this is exactly what ``train`` returns for the smaller vocabulary.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 256 <= vocab_size <= self.vocab_size:
            raise ValueError(f"vocab_size must be an int in 256..{self.vocab_size}, but it is {vocab_size!r}.")
        return type(self)(self.merges[: vocab_size - 256], self.pattern)

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ------------------------------------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = list(chunk.encode("utf-8", _ERRORS))
        while len(ids) > 1:
            # the earliest-learned merge that applies (merges are applied in training order)
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, 256 + self.ranks[pair])
        return ids

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``: pre-tokenise, then apply the merges inside each pre-token."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, but got a {type(text).__name__}.")
        if len(self._cache) > 200_000:
            self._cache.clear()                                            # bound the memory
        ids: list[int] = []
        for chunk in self._regex.findall(text):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._cache[chunk] = self._encode_chunk(chunk)
            ids.extend(cached)
        return ids

    def _token_id(self, value: object, caller: str = "decode") -> int:
        """``value`` as a token id: an int, or anything that is one (a numpy integer, a 0-d integer tensor)."""
        if isinstance(value, bool) or getattr(value, "is_floating_point", lambda: False)():
            index = None
        else:
            try:
                index = operator.index(value)
            except TypeError:
                index = None
        if index is None:
            shape = getattr(value, "shape", None)
            what = f"a {type(value).__name__} of shape {tuple(shape)}" if shape else repr(value)
            raise TypeError(f"{caller} expects integer token ids (a flat sequence of them for decode), but got "
                            f"{what}: pass a list of ints or a 1-D integer tensor.")
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"{caller} got {index}, which is not a token id of this tokenizer (ints in "
                             f"0..{self.vocab_size - 1}).")
        return index

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (a list of ints, or a 1-D integer tensor or array). Ids that cut a
        character's UTF-8 bytes apart decode to U+FFFD (�)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable) or getattr(ids, "ndim", 1) == 0:
            raise TypeError(f"decode expects a sequence of token ids, got {ids!r}; for one id i use decode([i]).")
        data = b"".join(self.vocab[self._token_id(i)] for i in ids)
        try:
            return data.decode("utf-8", _ERRORS)
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    def token_text(self, token_id: int) -> str:
        """A readable form of one token, e.g. ``'␣the'`` (a space shown as ␣, partial characters as �)."""
        text = self.vocab[self._token_id(token_id, "token_text")].decode("utf-8", "replace")
        return text.replace(" ", "␣").replace("\n", "↵")
