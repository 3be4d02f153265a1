"""course_lib.parts.synthetic: the exact entropy rate against independent computations and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib.parts.synthetic import SyntheticLanguage, make_language


@pytest.fixture(scope="module")
def small():
    return make_language(6, bigram_successors=3, trigram_successors=2, seed=3)


@pytest.fixture(scope="module")
def default():
    return make_language(32, bigram_successors=6, seed=0)


def test_rows_are_distributions_with_the_requested_sparse_structure():
    lang = make_language(16, bigram_successors=4, trigram_successors=2, epsilon=0.01, zipf=1.0, seed=1)
    P = lang.P
    assert P.shape == (16, 16, 16)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-12)
    # every row has at most k1 + k2 "big" entries; the rest is the epsilon floor
    u = 1 / np.arange(1, 17)
    floor = 0.01 * u / u.sum()
    big = (P > floor[None, None, :] * 1.0001).sum(-1)
    assert big.max() <= 4 + 2
    assert (P > 0).all()                                      # epsilon > 0: irreducible and aperiodic


def test_stationary_matches_the_leading_eigenvector_of_the_pair_chain(small):
    V = small.vocab_size
    M = np.zeros((V * V, V * V))                              # independent: the dense transition matrix
    for a in range(V):
        for b in range(V):
            for c in range(V):
                M[a * V + b, b * V + c] = small.P[a, b, c]
    values, vectors = np.linalg.eig(M.T)
    lead = np.real(vectors[:, np.argmax(np.real(values))])
    lead = lead / lead.sum()
    np.testing.assert_allclose(small.stationary().ravel(), lead, atol=1e-10)
    assert small.stationary().sum() == pytest.approx(1.0)


def test_entropy_rate_formula_by_loops(small):
    pi, P, V = small.stationary(), small.P, small.vocab_size
    H = sum(pi[a, b] * -sum(P[a, b, c] * np.log(P[a, b, c]) for c in range(V)) for a in range(V) for b in range(V))
    assert small.entropy_rate() == pytest.approx(H, rel=1e-12)
    assert small.entropy_rate() < small.bigram_entropy() < small.unigram_entropy() <= np.log(V) + 1e-12


def test_entropy_rate_equals_the_true_models_cross_entropy_on_sampled_text(default):
    """Monte Carlo: the mean −log P(x_t | x_{t−2}, x_{t−1}) over a long sample converges to H."""
    H = default.entropy_rate()
    x = default.sample(400_000, seed=7)
    nll = -np.log(default.P[x[:-2].numpy(), x[1:-1].numpy(), x[2:].numpy()])
    batch_means = nll[: len(nll) // 40 * 40].reshape(40, -1).mean(1)      # batch means for the error bar
    stderr = batch_means.std(ddof=1) / np.sqrt(40)
    assert abs(nll.mean() - H) < 4 * stderr + 1e-3
    assert default.cross_entropy(x) == pytest.approx(nll.mean(), rel=1e-12)


def test_bigram_entropy_against_a_monte_carlo_estimate(default):
    x = default.sample(400_000, seed=8).numpy()
    counts = np.zeros((32, 32))
    np.add.at(counts, (x[:-1], x[1:]), 1)
    Q = counts / counts.sum(1, keepdims=True)                 # plug-in estimate of P(x_t | x_{t-1})
    mu = counts.sum(1) / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        plug_in = -(mu[:, None] * np.where(Q > 0, Q * np.log(Q), 0)).sum()
    assert plug_in == pytest.approx(default.bigram_entropy(), abs=0.01)


def test_sampled_pairs_follow_the_stationary_distribution(default):
    x = default.sample(300_000, seed=9).numpy()
    counts = np.zeros((32, 32))
    np.add.at(counts, (x[:-1], x[1:]), 1)
    tv = 0.5 * np.abs(counts / counts.sum() - default.stationary()).sum()
    assert tv < 0.03


def test_window_floor(default):
    H, H1 = default.entropy_rate(), default.bigram_entropy()
    assert default.window_floor(1) == pytest.approx(H1)
    assert default.window_floor(16) == pytest.approx((H1 + 15 * H) / 16)
    assert H < default.window_floor(64) < default.window_floor(16)
    with pytest.raises(ValueError, match="positive int"):
        default.window_floor(0)


def test_sampling_is_seeded_and_shaped(default):
    a, b = default.sample(10_000, seed=1), default.sample(10_000, seed=1)
    assert a.dtype == torch.int64 and a.shape == (10_000,)
    assert torch.equal(a, b)
    assert not torch.equal(a, default.sample(10_000, seed=2))
    assert int(a.min()) >= 0 and int(a.max()) < 32
    train, val = default.train_val(5000, 3000, seed=0)
    assert train.shape == (5000,) and val.shape == (3000,)
    assert not torch.equal(train[:3000], val)
    assert make_language(32, bigram_successors=6, seed=0).P.tobytes() == default.P.tobytes()


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=2), "vocab_size"),
    (dict(vocab_size=1000), "vocab_size"),
    (dict(vocab_size=8, bigram_successors=9), "bigram_successors"),
    (dict(vocab_size=8, trigram_weight=1.5), "trigram_weight"),
    (dict(vocab_size=8, epsilon=0.0), "irreducible"),
])
def test_make_language_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_language(**kwargs)


def test_bad_streams_and_tables_are_refused(small):
    with pytest.raises(ValueError, match="n_tokens"):
        small.sample(1)
    with pytest.raises(ValueError, match="outside"):
        small.cross_entropy(np.array([0, 1, 99]))
    with pytest.raises(ValueError, match="probability distribution"):
        SyntheticLanguage(P=np.ones((3, 3, 3)), seed=0)
