"""course_lib.parts.classifier (and the statistics and run cache of the recorded experiments) against independent implementations: scikit-learn's metrics, transformers'
warm-up schedule, a per-sentence loop for pooling; training on a tiny random BERT."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from transformers import BertConfig, BertModel, BertTokenizerFast

from course_lib.experiments import cache
from course_lib.experiments import finetuning
from course_lib.experiments import lora
from course_lib.experiments import stats
from course_lib.parts import classifier as ft

WORDS = ["good", "great", "fun", "bad", "awful", "dull", "the", "film", "was", "not", "but", "plot"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is faster than several fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert tok("good film")["input_ids"] == [2, 5, 12, 3]
    return tok


def tiny_encoder(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).eval()


def toy_data(n: int, seed: int) -> dict[str, list]:
    """'good'-ish sentences are positive, 'bad'-ish ones negative; lengths vary, so padding varies."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        word = rng.choice(["good", "great", "fun"] if label else ["bad", "awful", "dull"])
        filler = " ".join(rng.choice(["the", "film", "was", "plot"], size=int(rng.integers(0, 6))))
        texts.append(f"{filler} {word}".strip())
        labels.append(label)
    return {"text": texts, "label": labels}


# ---- pooling ------------------------------------------------------------------------------------


def test_mean_pool_matches_a_per_sentence_loop():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    loop = torch.stack([hidden[b, : int(mask[b].sum())].mean(0) for b in range(3)])
    torch.testing.assert_close(ft.mean_pool(hidden, mask), loop)
    torch.testing.assert_close(ft.cls_pool(hidden, mask), hidden[:, 0])


def test_embed_does_not_depend_on_padding_or_order(tokenizer):
    encoder = tiny_encoder()
    texts = ["good", "the film was not good but the plot was fun", "bad film"]
    together = ft.embed(encoder, tokenizer, texts, batch_size=3)
    alone = torch.cat([ft.embed(encoder, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert together.shape == (3, 16) and together.dtype == torch.float32
    # the same thing by hand, straight from the encoder, for one sentence
    batch = tokenizer(["bad film"], return_tensors="pt")
    with torch.no_grad():
        direct = encoder(**batch).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(together[2:], direct, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ft.embed(encoder, tokenizer, texts, pooling="cls"), together)


def test_classifier_is_head_of_pooled_encoder(tokenizer):
    encoder = tiny_encoder()
    model = ft.SentenceClassifier(encoder, n_classes=3).eval()
    texts = ["good film", "the plot was dull"]
    batch = ft.tokenize(tokenizer, texts, max_length=16)
    with torch.no_grad():
        logits = model(**batch)
        by_hand = model.head(ft.mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]))
    torch.testing.assert_close(logits, by_hand)
    torch.testing.assert_close(ft.predict_logits(model, tokenizer, texts), logits, atol=1e-5, rtol=1e-4)
    trainable, total = ft.count_parameters(model.freeze_encoder())
    assert trainable == 16 * 3 + 3 and total == trainable + sum(p.numel() for p in encoder.parameters())
    assert ft.count_parameters(model.freeze_encoder(False))[0] == total


# ---- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes, seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_classification_metrics_match_sklearn(n_classes, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(n_classes, size=200)
    y_pred = np.where(rng.random(200) < 0.3, rng.integers(n_classes, size=200), y_true)
    ours = ft.classification_metrics(torch.tensor(y_true), list(y_pred), n_classes=n_classes)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=[1], average=None, zero_division=0)
    assert ours["accuracy"] == pytest.approx((y_true == y_pred).mean())
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p[0], r[0], f[0]))
    assert ours["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    np.testing.assert_array_equal(ours["confusion"], confusion_matrix(y_true, y_pred, labels=range(n_classes)))


def test_classification_metrics_zero_division_like_sklearn():
    y_true, y_pred = np.array([1, 0, 1, 0]), np.zeros(4, dtype=int)
    ours = ft.classification_metrics(y_true, y_pred)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
    assert (ours["precision"], ours["recall"], ours["f1"]) == (p, r, f) == (0, 0, 0)


def test_classification_metrics_bad_input():
    with pytest.raises(TypeError, match="argmax"):
        ft.classification_metrics([0, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="outside 0..1"):
        ft.classification_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="equally long"):
        ft.classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        ft.classification_metrics(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int))


# ---- training -----------------------------------------------------------------------------------


def test_fine_tuning_learns_and_restores_the_best_weights(tokenizer):
    train, val = toy_data(96, seed=0), toy_data(32, seed=1)
    model = ft.SentenceClassifier(tiny_encoder(), dropout=0.0)
    before = ft.evaluate(model, tokenizer, val)
    run = ft.train_classifier(model, tokenizer, train, val, epochs=6, lr=3e-3, batch_size=16, eval_every=3,
                              patience=100, progress=False)
    after = ft.evaluate(model, tokenizer, val)
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["accuracy"] == run.best_val_accuracy == max(run.column("val_accuracy"))
    # each row's lr is the one its step used: the schedule decays linearly to 0 *after* the last step
    warmup = round(0.1 * 36)
    assert run.steps == 36 and not run.stopped_early
    assert run.history[-1]["lr"] == pytest.approx(3e-3 * (36 - 35) / (36 - warmup))
    assert after["predictions"].shape == (32,) and set(after) >= {"accuracy", "f1", "confusion", "loss"}


def test_early_stopping_stops_and_the_frozen_encoder_stays_put(tokenizer):
    train, val = toy_data(64, seed=2), toy_data(16, seed=3)
    encoder = tiny_encoder()
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = ft.SentenceClassifier(encoder).freeze_encoder()
    run = ft.train_classifier(model, tokenizer, train, val, epochs=50, lr=1e-9, batch_size=16, eval_every=1,
                              patience=2, progress=False)
    assert run.stopped_early and run.steps == 3 and run.best_step == 1  # lr ~ 0: nothing ever improves
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)


def test_training_is_reproducible(tokenizer):
    train, val = toy_data(32, seed=4), toy_data(8, seed=5)

    def once():
        model = ft.SentenceClassifier(tiny_encoder(seed=1))
        start = model.head.weight.detach().clone()
        torch.manual_seed(0)  # dropout
        ft.train_classifier(model, tokenizer, train, val, epochs=1, lr=1e-3, batch_size=8, progress=False)
        return start, model.head.weight.detach().clone()

    start, first = once()
    assert not torch.equal(first, start), "training did not change the weights: equal runs would prove nothing"
    torch.testing.assert_close(first, once()[1], rtol=0, atol=0)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_gets_one_clear_sentence(tokenizer):
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="n_classes must be an int >= 2"):
        ft.SentenceClassifier(encoder, n_classes=1)
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        ft.SentenceClassifier(encoder, pooling="max")
    with pytest.raises(TypeError, match="config.hidden_size"):
        ft.SentenceClassifier(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(B, T, H\) and an attention mask \(B, T\)"):
        ft.mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(TypeError, match="wrap a single sentence in a list"):
        ft.embed(encoder, tokenizer, "good film")
    with pytest.raises(TypeError, match="'text' and a 'label' column"):
        ft.evaluate(ft.SentenceClassifier(encoder), tokenizer, {"sentence": ["good"], "label": [1]})
    with pytest.raises(ValueError, match="train labels must lie in 0..1"):
        ft.train_classifier(ft.SentenceClassifier(encoder), tokenizer, {"text": ["good"], "label": [2]},
                            {"text": ["good"], "label": [1]}, progress=False)
    with pytest.raises(TypeError, match="asset name, a folder or a Hub id"):
        ft.load_encoder(None, name=None)


# ---- the real encoder (only when its asset is in the cache) -------------------------------------


def test_minilm_loads_and_embeds_sensibly():
    from course_lib.tools.assets import is_cached

    if not is_cached("minilm-l6-v2", verify=False):
        pytest.skip("the minilm-l6-v2 asset is not cached (python -m course_lib.tools.assets fetch minilm-l6-v2)")
    tokenizer, encoder = ft.load_encoder(None)
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384
    assert ft.count_parameters(encoder)[1] == pytest.approx(22.7e6, rel=0.01)
    e = torch.nn.functional.normalize(ft.embed(encoder, tokenizer, [
        "A wonderful, moving film.", "A touching and beautiful movie.", "The tax form is due in April."]), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_paired_bootstrap_gap_is_the_resampled_difference_of_accuracies():
    from course_lib.experiments.stats import paired_bootstrap_gap

    rng = np.random.default_rng(1)
    right_a = rng.random(300) < 0.8
    right_b = rng.random(300) < 0.6
    gap, low, high = paired_bootstrap_gap(right_a, right_b, rng=np.random.default_rng(7), resamples=500)
    # the definition, written out: the same resampled examples for both methods
    draws = np.random.default_rng(7).integers(0, 300, size=(500, 300))
    expected = np.percentile([right_a[i].mean() - right_b[i].mean() for i in draws], [2.5, 97.5])
    assert gap == pytest.approx(right_a.mean() - right_b.mean())
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < gap < high
    # a wider level gives a wider interval; identical methods have no gap at all
    _, low99, high99 = paired_bootstrap_gap(right_a, right_b, rng=np.random.default_rng(7), resamples=500, level=0.99)
    assert low99 <= low and high99 >= high
    assert paired_bootstrap_gap(right_a, right_a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long 1-D"):
        paired_bootstrap_gap(right_a, right_b[:10])
    with pytest.raises(ValueError, match="coverage between 0 and 1"):
        paired_bootstrap_gap(right_a, right_b, level=95)


# ---- several seeds, recorded experiments ------------------------------------------------------------


def test_seed_bootstrap_resamples_seeds_and_examples_together():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 80)) < 0.8, rng.random((3, 80)) < 0.7
    gap, low, high = stats.paired_bootstrap_gap_seeds(a, b, rng=np.random.default_rng(0), resamples=300)
    # the definition written out with the same draws: examples first, then seeds
    draws = np.random.default_rng(0)
    columns, rows = draws.integers(0, 80, size=(300, 80)), draws.integers(0, 3, size=(300, 3))
    d = a.astype(float) - b
    gaps = [np.mean([d[s][columns[k]].mean() for s in rows[k]]) for k in range(300)]
    assert gap == pytest.approx(d.mean())
    assert (low, high) == pytest.approx(tuple(np.percentile(gaps, [2.5, 97.5])), abs=1e-12)
    # one seed is the plain paired bootstrap
    assert stats.paired_bootstrap_gap_seeds(a[:1], b[:1], resamples=300) == pytest.approx(
        stats.paired_bootstrap_gap(a[0], b[0], resamples=300))
    # seeds that disagree widen the interval compared with seeds that repeat one run
    spread = stats.paired_bootstrap_gap_seeds(np.stack([a[0], ~a[0], a[0]]), np.stack([b[0]] * 3), resamples=300)
    same = stats.paired_bootstrap_gap_seeds(np.stack([a[0]] * 3), np.stack([b[0]] * 3), resamples=300)
    assert spread[2] - spread[1] > same[2] - same[1]
    with pytest.raises(ValueError, match="equally shaped"):
        stats.paired_bootstrap_gap_seeds(a, b[:2])


def test_take_is_a_fixed_shuffle_and_sizes_exist_for_every_profile():
    import datasets

    from course_lib.tools.data import take

    data = datasets.Dataset.from_dict({"text": [str(i) for i in range(50)], "label": [i % 2 for i in range(50)]})
    assert take(data, None) is data and take(data, 80) is data
    small, large = take(data, 10, seed=1), take(data, 20, seed=1)
    assert small["text"] == large["text"][:10] and small["text"] != take(data, 10, seed=2)["text"]
    for name in ("ci", "cpu", "gpu"):
        assert finetuning.finetuning_sizes(name)["lrs"] and lora.lora_sizes(name)["search_rank"] in lora.lora_sizes(name)["ranks"]
    with pytest.raises(ValueError, match="no sizes for profile"):
        lora.lora_sizes("tpu")


def test_run_cache_resumes_and_shares_runs_between_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_COMMIT", "abc123")
    LOAD = 0.25
    monkeypatch.setattr(cache, "run_load", lambda: LOAD)   # every run keeps the load it ended at
    sizes = dict(n=3, lrs=(1, 2))
    first = cache.RunCache("demo", "cpu", sizes, root=tmp_path)
    calls = []
    assert first.get(dict(lr=1), lambda: calls.append(1) or {"x": 1})["x"] == 1
    # a new process (a new cache object) finds the run, also when only the grid changed
    again = cache.RunCache("demo", "cpu", dict(n=3, lrs=(1, 2, 3)), root=tmp_path)
    assert again.get(dict(lr=1), lambda: calls.append(2) or {"x": 2}) == {
        "x": 1, "commit": "abc123 (from COURSE_COMMIT)", "load_average_1min": LOAD}
    assert calls == [1]
    # a run claimed by a live process is waited for, not computed twice
    other = cache.RunCache("demo", "cpu", sizes, root=tmp_path)
    key = other.key(dict(lr=2))
    other._lock(key).parent.mkdir(exist_ok=True)
    other._lock(key).write_text(str(os.getpid()))  # "another process" (this one) holds it
    assert not other._claim(key)
    with open(other.path, "a") as f:  # ... and finishes it
        f.write(json.dumps({"key": key, "value": {"x": 5}}) + "\n")
    assert other.get_many([(dict(lr=2), lambda: {"x": 6})], poll_seconds=0.01) == [{"x": 5}]
    # a lock left by a dead process is taken over
    dead = cache.RunCache("demo", "cpu", sizes, root=tmp_path)
    key3 = dead.key(dict(lr=3))
    dead._lock(key3).write_text("999999999")
    assert dead.get(dict(lr=3), lambda: {"x": 7})["x"] == 7 and not dead._lock(key3).exists()
    # a shaping size is part of the key
    assert cache.RunCache("demo", "cpu", dict(n=4), root=tmp_path).key(dict(lr=1)) != first.key(dict(lr=1))


def test_compare_resamples_seeds_and_examples_and_gives_a_three_way_verdict():
    from course_lib.experiments.stats import MARGIN, compare, verdict_of

    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.8
    a = np.stack([truth ^ (rng.random(2000) < 0.05) for _ in range(3)])
    clearly_worse = np.stack([truth ^ (rng.random(2000) < 0.25) for _ in range(3)])
    result = compare(a, clearly_worse, a="A", b="worse")
    assert result.verdict == "ahead" and result.low > MARGIN and result.seeds == 3 and result.examples == 2000
    assert compare(clearly_worse, a).verdict == "behind"
    assert compare(a, a).verdict == "within" and compare(a, a).gap == 0
    # the same method from other seeds: undecided on 2,000 examples, equal within a point on 8,000
    other = np.stack([truth ^ (rng.random(2000) < 0.05) for _ in range(3)])
    assert compare(a, other).verdict == "undecided"
    big = rng.random(8000) < 0.8
    twins = [np.stack([big ^ (rng.random(8000) < 0.05) for _ in range(3)]) for _ in range(2)]
    assert compare(*twins, resamples=500).verdict == "within"
    # a small test set cannot tell a 2-point gap
    assert compare(a[:, :60], clearly_worse[:, :60] | a[:, :60]).verdict in ("undecided", "behind")
    assert verdict_of(-0.4, 1.9) == "undecided" and verdict_of(-0.9, 0.9) == "within" and verdict_of(1.1, 3) == "ahead"
    one_seed = compare(a[0], clearly_worse[0])
    assert one_seed.seeds == 1 and "one seed" in one_seed.sentence()
    assert "3 seeds × 2,000 examples, both resampled" in result.sentence() and "A is ahead by more than 1 point" in \
        result.sentence()
    with pytest.raises(ValueError, match="margin"):
        compare(a, a, margin=-1)


def test_fixed_step_training_reports_every_steps_loss(tokenizer):
    from course_lib.parts.classifier import SentenceClassifier, train_fixed_steps

    torch.manual_seed(0)
    model = SentenceClassifier(tiny_encoder(), n_classes=2)
    out = train_fixed_steps(model, tokenizer, toy_data(24, 0), lr=1e-3, steps=6, batch_size=4, max_length=12)
    assert len(out["losses"]) == 6 and all(isinstance(x, float) for x in out["losses"])
    assert out["final_loss"] == pytest.approx(np.mean(out["losses"][-5:]))


def test_records_keep_what_compare_needs_and_what_it_said():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    truth = rng.random(300) < 0.8
    right = {"A": np.stack([truth ^ (rng.random(300) < 0.05) for _ in range(2)]),
             "B": np.stack([truth ^ (rng.random(300) < 0.3) for _ in range(2)]),
             "C": np.stack([truth ^ (rng.random(300) < 0.06) for _ in range(2)])}
    table = finetuning.all_comparisons(right)
    assert list(table) == ["A − B", "A − C", "B − C"]
    direct = stats.compare(right["A"], right["B"], a="A", b="B")
    assert table["A − B"]["verdict"] == direct.verdict == "ahead" and table["A − B"]["low"] == direct.low
    # a record stores each seed's correctness as a bit string; recorded_right reads it back
    stored = {m: [cache.bits(row) for row in rows] for m, rows in right.items()}
    back = finetuning.recorded_right(json.loads(json.dumps(stored)))
    assert all(np.array_equal(back[m], right[m]) for m in right)
    assert stats.compare(back["A"], back["B"], a="A", b="B") == direct
    with pytest.raises(TypeError, match="table of bit strings"):
        finetuning.recorded_right(["0101"])
    comparisons = [stats.Comparison(**row) for row in table.values()]
    ax = finetuning.plot_comparisons(comparisons, title="test")
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table) and ax.get_title() == "test"
    plt.close("all")
