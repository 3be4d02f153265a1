"""Lesson 09's pictures of an example and of the answers (course_lib.parts.causal_lm), and the recorded run's
comparisons (course_lib.experiments.lora_causal_lm.versus_prompts) against stats.compare itself."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from course_lib.experiments import lora_causal_lm as lx  # noqa: E402
from course_lib.experiments.stats import compare  # noqa: E402
from course_lib.parts import causal_lm as clm  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_every_token_of_a_prompt_belongs_to_its_turn(tokenizer):
    ids = clm.prompt_ids(tokenizer, "A gorgeous, moving film.", shots=[("Dull.", 0)])
    turns = clm.token_turns(tokenizer, ids)
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert [t == "special" for t in turns] == [i in (start, end) for i in ids]
    # the turns in order: system, user (the shot), assistant (its answer), user, then the opened assistant turn
    order = [t for k, t in enumerate(turns) if t != "special" and (k == 0 or turns[k - 1] == "special")]
    assert order == ["system", "system", "user", "user", "assistant", "assistant", "user", "user", "assistant"]
    assert turns[-1] == "assistant" and tokenizer.decode(ids[-3:]).endswith("assistant\n")


def test_the_masking_picture_colours_exactly_the_scored_positions(tokenizer):
    ids, labels = clm.encode(tokenizer, "It's a road trip drama with too many wrong turns.", 0)
    first = len(ids) - 20
    ax = clm.draw_tokens(tokenizer, ids, labels, first=first)
    faces = [matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches]
    assert len(faces) == 20
    assert faces.count("#fd8d3c") == sum(label != clm.IGNORE for label in labels[first:]) == len(
        clm.answer_ids(tokenizer, 0))
    plt.close("all")


def test_the_token_picture_refuses_labels_of_another_length(tokenizer):
    ids, labels = clm.encode(tokenizer, "Fine.", 1)
    with pytest.raises(ValueError, match=r"ids and labels must be equally long .* got \d+ and \d+"):
        clm.draw_tokens(tokenizer, ids, labels[:-1])


def test_the_answers_picture_counts_every_snippet_once():
    labels = [1, 0, 1, 1]
    replies = {"always positive": ['{"sentiment": "positive"}'] * 4,
               "mixed": ['{"sentiment": "negative"}', "positive", '{"sentiment": "positive"}', "nonsense"]}
    ax = clm.draw_answers(replies, labels)
    widths = np.array([p.get_width() for p in ax.patches]).reshape(3, 2)  # (positive, negative, none) × method
    assert widths.sum(axis=0).tolist() == [4, 4]
    assert widths[:, 0].tolist() == [4, 0, 0] and widths[:, 1].tolist() == [1, 1, 2]
    plt.close("all")


def _record(lora_right, prompt_right):
    return {"lora": [{"right": r} for r in lora_right],
            "scores": {name: {"right": r} for name, r in prompt_right.items()}}


def test_versus_prompts_is_compare_with_the_greedy_prompt_repeated_for_every_seed():
    rng = np.random.default_rng(0)
    lora_right = rng.integers(0, 2, size=(3, 40)).tolist()
    few = rng.integers(0, 2, size=40).tolist()
    result = lx.versus_prompts(_record(lora_right, {"4-shot": few, "zero-shot": [0] * 40}))
    expected = compare(np.array(lora_right), np.tile(few, (3, 1)), a="LoRA", b="4-shot")
    got = result["4-shot"]
    assert (got.gap, got.low, got.high, got.verdict, got.seeds, got.examples) == (
        expected.gap, expected.low, expected.high, expected.verdict, 3, 40)
    assert result["zero-shot"].verdict == "ahead" and set(result) == {"4-shot", "zero-shot"}


def test_versus_prompts_names_a_stale_record_and_the_command_that_remakes_it():
    stale = {"lora": [{"seed": 0, "accuracy": 0.7}], "scores": {"4-shot": {"accuracy": 0.5}}}
    with pytest.raises(ValueError, match=r"predates per-snippet correctness .* `python -m course_lib.experiments "
                                         r"lora_causal_lm --profile gpu`"):
        lx.versus_prompts(stale)
