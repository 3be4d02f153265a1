"""Comparing two methods: paired bootstrap intervals over test examples and seeds, and one verdict.

Explained in notebooks/06_finetuning.ipynb (exercise 06.3 writes the paired bootstrap). Every comparison of
methods in lessons 03 and 06-09 and in the recorded experiments goes through :func:`compare`: the gap in
points with an interval that resamples seeds and examples together, and a three-way verdict against a stated
practical margin (:data:`MARGIN`): ahead, within ±margin, or not yet distinguishable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def paired_bootstrap_gap(right_a: Any, right_b: Any, *, rng: np.random.Generator | None = None,
                         resamples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same test examples, with a paired bootstrap interval.

    ``right_a`` and ``right_b`` say, per test example, whether each method got it right. The test set is
    resampled with replacement ``resamples`` times, the same examples for both methods (that pairing is
    what makes the interval narrow: both are judged on the same hard and easy examples), and the gap is
    recomputed on each resample. Returns (gap, low, high) as fractions; (low, high) holds the central
    ``level`` of the resampled gaps. Notebook 06 writes it (exercise 06.3); :func:`compare` builds on its
    seeds-and-examples form, :func:`paired_bootstrap_gap_seeds`.
    """
    a, b = np.asarray(right_a, dtype=float), np.asarray(right_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"right_a and right_b must be equally long 1-D arrays, one entry per test example; "
                         f"got shapes {a.shape} and {b.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage between 0 and 1 (e.g. 0.95), got {level}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(axis=1) - b[index].mean(axis=1)
    low, high = np.percentile(gaps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(a.mean() - b.mean()), float(low), float(high)



def paired_bootstrap_gap_seeds(right_a: Any, right_b: Any, *, rng: np.random.Generator | None = None,
                               resamples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Like :func:`paired_bootstrap_gap`, for methods run with several seeds on the same test examples.

    ``right_a`` and ``right_b`` have shape (seeds, examples): row s says which test examples each method
    got right in run s (runs of the same seed share their labelled examples and batch order, so they
    are paired too). Each resample draws the seeds *and* the test examples with replacement, the same
    draw for both methods, and recomputes the gap of the mean accuracies; so the interval holds both the
    luck of the test sample and the seed-to-seed spread. With 3 seeds the seed part is crude (a
    bootstrap over 3 values underestimates their spread by a factor of about sqrt(2/3)): the per-seed
    gaps are worth printing beside it. Returns (gap, low, high) as fractions.
    """
    a, b = np.atleast_2d(np.asarray(right_a, dtype=float)), np.atleast_2d(np.asarray(right_b, dtype=float))
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"right_a and right_b must be equally shaped (seeds, examples) arrays, got shapes "
                         f"{a.shape} and {b.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage between 0 and 1 (e.g. 0.95), got {level}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    n_seeds, n = a.shape
    d = a - b
    columns = rng.integers(0, n, size=(resamples, n))
    rows = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    per_seed = np.stack([d[s][columns].mean(axis=1) for s in range(n_seeds)])  # (seeds, resamples)
    gaps = per_seed[rows, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = np.percentile(gaps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(d.mean()), float(low), float(high)



# ----------------------------------------------------------------------------------------------
# The one way the course compares two methods: an interval over seeds and examples, a three-way verdict
# ----------------------------------------------------------------------------------------------

#: The practical margin of the course's verdicts, in accuracy points: gaps smaller than this are not worth
#: a method choice on these tasks, so an interval inside ±MARGIN reads "within ±1 point".
MARGIN = 1.0


@dataclass(frozen=True)
class Comparison:
    """A − B in points (accuracy × 100) with its interval, and what it lets us say.

    ``verdict`` is one of
      * ``"ahead"``: A leads by more than the margin (the whole interval is above +margin), or ``"behind"``;
      * ``"within"``: the whole interval lies inside ±margin: the two are practically equal;
      * ``"undecided"``: neither: the data cannot tell yet (more seeds or examples would).
    """

    a: str
    b: str
    gap: float
    low: float
    high: float
    margin: float
    verdict: str
    per_seed: tuple[float, ...]
    seeds: int
    examples: int
    level: float = 0.95

    def sentence(self) -> str:
        """One line: the gap, its interval, what was resampled, and the verdict in words."""
        def pts(x: float) -> str:
            return f"{round(x, 1) + 0.0:+.1f}"   # + 0.0 turns a rounded -0.0 into 0.0

        verdict = {"ahead": f"{self.a} is ahead by more than {self.margin:g} point{'s' * (self.margin != 1)}",
                   "behind": f"{self.b} is ahead by more than {self.margin:g} point{'s' * (self.margin != 1)}",
                   "within": f"within ±{self.margin:g} point{'s' * (self.margin != 1)} of each other",
                   "undecided": "not yet distinguishable at this size"}[self.verdict]
        resampled = (f"{self.seeds} seeds × {self.examples:,} examples, both resampled" if self.seeds > 1
                     else f"{self.examples:,} examples resampled, one seed")
        return (f"{self.a} − {self.b}: {pts(self.gap)} points, {100 * self.level:.0f}% interval [{pts(self.low)}, "
                f"{pts(self.high)}] ({resampled}) → {verdict}")


def verdict_of(low: float, high: float, margin: float = MARGIN) -> str:
    """The three-way verdict of an interval [low, high] (points) against a practical margin."""
    if low > margin:
        return "ahead"
    if high < -margin:
        return "behind"
    if -margin <= low and high <= margin:
        return "within"
    return "undecided"


def compare(right_a: Any, right_b: Any, *, a: str = "A", b: str = "B", margin: float = MARGIN,
            level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Comparison:
    """Compare two methods on the same test examples: the course's one way (lessons 03, 06-09).

    ``right_a`` and ``right_b`` say which examples each method got right: shape (examples,) for one run, or
    (seeds, examples) for runs from several seeds (row s of both from the same seed: same data and batch
    order). Each bootstrap resample draws the seeds *and* the examples with replacement, the same draw for
    both methods (:func:`paired_bootstrap_gap_seeds`), so the interval holds the luck of the test sample and
    the seed-to-seed spread. The verdict (:func:`verdict_of`) needs the whole interval beyond ±``margin``
    to call a winner and inside it to call them equal; anything else is "not yet distinguishable", so a
    verdict never flips on a tenth of a point.
    """
    ra, rb = np.atleast_2d(np.asarray(right_a, dtype=float)), np.atleast_2d(np.asarray(right_b, dtype=float))
    if not margin >= 0:
        raise ValueError(f"margin is a number of accuracy points >= 0 (the course uses {MARGIN}), got {margin!r}.")
    gap, low, high = paired_bootstrap_gap_seeds(ra, rb, rng=np.random.default_rng(seed), resamples=resamples,
                                                level=level)
    gap, low, high = 100 * gap, 100 * low, 100 * high
    per_seed = tuple(100 * float(x) for x in ra.mean(axis=1) - rb.mean(axis=1))
    return Comparison(a=a, b=b, gap=gap, low=low, high=high, margin=margin, verdict=verdict_of(low, high, margin),
                      per_seed=per_seed, seeds=ra.shape[0], examples=ra.shape[1], level=level)
