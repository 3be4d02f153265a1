"""course_lib.parts.peft_family: each method's trainable count against its formula, prompt and prefix tuning
against peft given the same parameters, AdaLoRA's penalty and schedule, the training loop and memory split.

A small random BERT (same architecture as MiniLM, 2 layers of width 32) keeps these tests fast."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from course_lib.parts import lora, peft_family as pf, quant
from course_lib.parts import classifier as finetune

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
L, D, HEADS, FF = 2, 32, 4, 64


@pytest.fixture(scope="module")
def encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1200, hidden_size=D, num_hidden_layers=L, num_attention_heads=HEADS,
                        intermediate_size=FF, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 1200, (3, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


HEAD = D * 2 + 2


def test_bitfit_and_probe_counts(encoder):
    biases = L * (4 * D + D + FF + D + D) + D  # q, k, v, o, attention LN, ffn in, ffn out, output LN; embeddings LN
    assert trainable(lora.apply_bitfit(pf.classifier(encoder), trainable_extra=["head"])) == biases + HEAD
    assert trainable(pf.classifier(encoder).freeze_encoder()) == HEAD


def test_adapters_count_placement_and_near_identity_start(encoder, batch):
    m = 4
    model = pf.apply_adapters(pf.classifier(encoder), m)
    assert trainable(model) == pf.adapter_count(L, D, m) + HEAD
    adapters = [n for n, mod in model.named_modules() if isinstance(mod, pf.Adapter)]
    assert len(adapters) == 2 * L and all("output.dense.adapter" in n for n in adapters)
    base = pf.classifier(encoder)
    with torch.no_grad():
        model.head.load_state_dict(base.head.state_dict())
        gap = (model.eval()(**batch) - base.eval()(**batch)).abs().max()
        for mod in model.modules():
            if isinstance(mod, pf.Adapter):
                mod.up.weight.zero_()
        exact = torch.equal(model(**batch), base(**batch))
    assert 0 < gap < 0.05 and exact  # near the identity; exactly it once W_up = 0
    with pytest.raises(ValueError, match="bottleneck"):
        pf.Adapter(8, 0)


def test_prompt_tuning_equals_peft_given_the_same_soft_tokens(encoder, batch):
    import peft

    n = 5
    ours = pf.PromptTuning(pf.classifier(encoder), n)
    assert trainable(ours) == n * D + HEAD
    theirs = peft.get_peft_model(copy.deepcopy(encoder), peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=n))
    assert theirs.get_nb_trainable_parameters()[0] == n * D
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prompt)
        hidden = theirs(**batch).last_hidden_state  # (B, n + T, d): the sequence grew
        mask = torch.cat([torch.ones(3, n, dtype=torch.long), batch["attention_mask"]], 1)
        expected = ours.base.head(finetune.mean_pool(hidden, mask))
        assert hidden.shape[1] == n + batch["input_ids"].shape[1]
        assert torch.allclose(ours.eval()(**batch), expected, atol=1e-6)
    words = encoder.get_input_embeddings().weight
    assert any(torch.equal(ours.prompt[0], row) for row in words)  # sampled-vocabulary start


def test_prefix_tuning_equals_peft_given_the_same_prefix(encoder, batch):
    import peft

    n = 3
    ours = pf.PrefixTuning(pf.classifier(encoder), n)
    assert trainable(ours) == 2 * L * n * D + HEAD
    theirs = peft.get_peft_model(copy.deepcopy(encoder), peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=n))
    assert theirs.get_nb_trainable_parameters()[0] == 2 * L * n * D
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.peft_layout())
        hidden = theirs(**batch).last_hidden_state  # T positions: the prefix is not part of the output
        mask = torch.cat([torch.ones(3, n, dtype=torch.long), batch["attention_mask"]], 1)
        mine = ours.base.encoder(input_ids=batch["input_ids"], attention_mask=mask,
                                 past_key_values=ours.cache(3)).last_hidden_state
        assert torch.equal(mine, hidden)
        plain = encoder(**batch).last_hidden_state
        assert (mine - plain).abs().max() > 1e-3  # the prefix does change the states
        logits = ours.eval()(**batch)
        assert torch.allclose(logits, ours.base.head(finetune.mean_pool(hidden, batch["attention_mask"])))


def test_prefix_starts_from_real_word_keys(encoder):
    """The prefix is what the frozen model's key and value projections give for real vocabulary tokens
    (Li & Liang 2021, Sec. 7.2), recomputed here from the hidden states the encoder itself returns; the
    encoder's dropout is off while they are computed and its mode is given back."""
    base = pf.classifier(encoder)
    base.encoder.train()  # dropout on: the prefix must not depend on it
    ours = pf.PrefixTuning(base, 2, seed=3)
    assert base.encoder.training, "the encoder's train mode is restored"
    ids = pf._sample_vocabulary(encoder, 2, torch.Generator().manual_seed(3))
    assert bool((ids >= 1000).all()), "ordinary word pieces, not [PAD], [unused] or specials"
    with torch.no_grad():
        states = encoder(input_ids=ids[None], output_hidden_states=True).hidden_states  # eval mode
        for layer in range(L):
            attention = encoder.encoder.layer[layer].attention.self
            assert torch.allclose(ours.prefix[layer, 0], attention.key(states[layer])[0], atol=1e-6), layer
            assert torch.allclose(ours.prefix[layer, 1], attention.value(states[layer])[0], atol=1e-6), layer
    assert not torch.equal(ours.prefix, pf.PrefixTuning(pf.classifier(encoder), 2, seed=4).prefix), "the seed counts"


def test_prefix_length_must_be_a_positive_integer(encoder):
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="n_virtual"):
            pf.PrefixTuning(pf.classifier(encoder), bad)


def test_adalora_adds_its_penalty_allocates_and_counts(encoder, batch):
    model = pf.apply_adalora(pf.classifier(encoder), total_step=12, init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
    per_matrix = {"W_q": D + D, "W_k": D + D, "W_v": D + D, "W_o": D + D, "W_f1": D + FF, "W_f2": FF + D}
    assert trainable(model) == L * sum(4 * (s + 1) for s in per_matrix.values()) + HEAD
    labels = torch.tensor([1, 0, 1])
    model.eval()
    out = model(**batch, labels=labels)
    plain = torch.nn.functional.cross_entropy(model(**batch), labels)
    assert out.loss > plain + 0.1  # the orthogonality penalty is in the loss
    texts = {"text": ["good", "bad", "fine film", "awful"] * 3, "label": [1, 0, 1, 0] * 3}

    class Tok:  # a whitespace tokenizer over the tiny vocabulary
        def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
            ids = [[1000 + (hash(w) % 200) for w in t.split()][:max_length] for t in texts]
            T = max(map(len, ids))
            return {"input_ids": torch.tensor([i + [0] * (T - len(i)) for i in ids]),
                    "attention_mask": torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i in ids])}

    steps = []
    run = pf.train_method(model, Tok(), texts, lr=1e-2, steps=12, batch_size=4, on_step=lambda s: (
        steps.append(s), model.update_and_allocate(s)))
    assert steps == list(range(12)) and run["trainable"] == trainable(model)
    ranks = pf.adalora_ranks(model)
    assert len(ranks) == 6 * L and set(ranks) == {(i, m) for i in range(L) for m in per_matrix}
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget ends at target_r per matrix on average


def test_memory_split_and_saved_tensors(encoder, batch):
    full = pf.classifier(encoder)
    probe = pf.classifier(encoder).freeze_encoder()
    low = lora.apply_lora(pf.classifier(encoder), ["query", "value"], r=2, alpha=4, trainable_extra=["head"])
    q = quant.apply_qlora(pf.classifier(encoder), ["query", "value"], r=2, alpha=4)
    split = {name: pf.memory_split(m, batch) for name, m in
             (("full", full), ("probe", probe), ("lora", low), ("qlora", q))}
    n_full = trainable(full)
    assert split["full"]["gradients"] == 4 * n_full and split["full"]["optimizer"] == 8 * n_full
    buffers = sum(b.numel() * b.element_size() for b in full.buffers())  # BERT's position and type ids
    assert split["full"]["weights"] == 4 * sum(p.numel() for p in full.parameters()) + buffers
    assert split["probe"]["activations"] < split["lora"]["activations"] < split["full"]["activations"]
    assert split["qlora"]["weights"] < split["lora"]["weights"]
    assert split["qlora"]["activations"] == split["lora"]["activations"]


def test_train_method_is_seeded_and_returns_what_the_table_needs(encoder):
    data = {"text": [f"w{i} w{i + 1}" for i in range(8)], "label": [0, 1] * 4}

    class Tok:
        def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
            ids = torch.tensor([[1000 + int(w[1:]) for w in t.split()] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    runs = [pf.train_method(pf.classifier(encoder).freeze_encoder(), Tok(), data, lr=1e-2, steps=3, batch_size=4)
            for _ in range(2)]
    assert runs[0]["losses"] == runs[1]["losses"] and len(runs[0]["losses"]) == 3
    assert runs[0]["optimizer_bytes"] >= 8 * HEAD and runs[0]["step_ms"] > 0
    with pytest.raises(ValueError, match="no trainable"):
        pf.train_method(pf.classifier(encoder).requires_grad_(False), Tok(), data, lr=1e-2, steps=1)


def test_build_knows_every_method_and_refuses_others(encoder):
    with pytest.raises(ValueError, match="Unknown method"):
        pf.build("IA3", encoder)
    assert set(pf.METHODS) == {"full fine-tuning", "linear probe", "BitFit", "adapters", "prompt tuning",
                               "prefix tuning", "LoRA", "AdaLoRA", "QLoRA"}
    assert all(len(lrs) >= 2 for lrs in pf.METHODS.values())


def test_experiment_records_choices_per_seed_correctness_and_comparisons(monkeypatch, encoder):
    """The experiment's bookkeeping, with the cheapest method twice and a tiny data set."""
    from course_lib.experiments import peft_family as px
    from course_lib.experiments.stats import compare
    from course_lib.tools.profiles import get_profile

    small = {"text": [f"w{i}" for i in range(16)], "label": [0, 1] * 8}
    monkeypatch.setattr(px, "METHODS", {"full fine-tuning": (1e-2,), "linear probe": (1e-3, 1e-2)})
    monkeypatch.setattr(px, "load_classifier_parts", lambda profile=None: (TinyTok(), encoder))
    monkeypatch.setattr(px, "task_data", lambda sizes: dict(train=small, validation=small, test=small))
    monkeypatch.setattr(finetune, "_length_sorted_batches",
                        lambda tok, texts, bs, ml: iter([(list(range(len(texts))), tok(texts, return_tensors="pt"))]))
    result = px.experiment(get_profile("ci"), seeds=2)
    probe, full = result["methods"]["linear probe"], result["methods"]["full fine-tuning"]
    assert set(probe["validation_accuracy_by_lr"]) == {"0.001", "0.01"} and probe["lr"] in (1e-3, 1e-2)
    assert len(probe["test_accuracy_by_seed"]) == 2
    assert np.isclose(probe["test_accuracy"], np.mean(probe["test_accuracy_by_seed"]))
    # which snippets each seed got right: (seeds, examples) of 0/1, consistent with the accuracies
    right = np.array(probe["test_correct_by_seed"])
    assert right.shape == (2, 16) and set(np.unique(right)) <= {0, 1}
    assert np.allclose(right.mean(axis=1), probe["test_accuracy_by_seed"])
    # the recorded comparison is compare() on those arrays: seeds and snippets resampled together
    expected = compare(right, np.array(full["test_correct_by_seed"]), a="linear probe", b="full fine-tuning")
    recorded = probe["versus_full"]
    assert recorded["seeds"] == 2 and recorded["examples"] == 16 and recorded["verdict"] == expected.verdict
    assert np.allclose([recorded["gap"], recorded["low"], recorded["high"]], [expected.gap, expected.low, expected.high])
    assert "versus_full" not in full
    json.dumps(result)  # plain JSON types: the record can be written


def test_versus_full_names_a_stale_record_and_the_command_that_remakes_it():
    from course_lib.experiments import peft_family as px

    old = {"methods": {"full fine-tuning": {"test_accuracy_by_seed": [0.8]}, "LoRA": {"test_accuracy_by_seed": [0.7]}}}
    with pytest.raises(ValueError, match=r"predates per-seed correctness .* `python -m course_lib.experiments "
                                         r"peft_family`"):
        px.versus_full(old)


class TinyTok:
    def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors=None):
        ids = [[1000 + int(t[1:]) % 200] for t in texts]
        if return_tensors is None:
            return {"input_ids": ids}
        ids = torch.tensor(ids)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
