"""lesson 04's character model: the exact held-out loss (course_lib.parts.lm) predicts every character once; the
recipes of the recorded search (course_lib.experiments.char_lm) are well formed."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from course_lib.experiments.char_lm import RECIPES, TUNING_WORKS, recipe
from course_lib.parts.lm import heldout_loss
from course_lib.tools.data import VALIDATION_WORKS
from course_lib.parts.model import GPT, GPTConfig
from course_lib.tools.profiles import get_profile

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("length", [2, 17, 64, 65, 200])
def test_heldout_loss_predicts_every_character_once(length):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context=16, n_layer=1, n_head=2, d_model=16))
    tokens = torch.randint(0, 20, (length,))
    losses = []                                            # by hand: window after window of 16 inputs
    for start in range(0, length - 1, 16):
        x = tokens[start:min(start + 16, length - 1)]
        y = tokens[start + 1:start + 1 + len(x)]
        logits, _ = model(x[None])
        losses.append(F.cross_entropy(logits[0], y, reduction="none"))
    expected = torch.cat(losses)
    assert len(expected) == length - 1
    assert math.isclose(heldout_loss(model, tokens, context=16, batch_size=3), expected.mean().item(), rel_tol=1e-5)
    assert model.training                                  # the mode is restored


def test_heldout_loss_refuses_a_batch():
    model = GPT(GPTConfig(vocab_size=20, context=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ValueError, match="1-D stream"):
        heldout_loss(model, torch.zeros(2, 10, dtype=torch.long), context=16)


def test_recipes_fit_each_profile_and_tuning_works_are_not_held_out():
    assert set(RECIPES) == {"ci", "cpu", "gpu"}
    for name in RECIPES:
        plan = recipe(get_profile("ci") if name == "ci" else get_profile("cpu")) if name != "gpu" else RECIPES["gpu"]
        assert 0 < plan["warmup_steps"] < plan["steps"] and plan["lr"] > 0
    assert not set(TUNING_WORKS) & set(VALIDATION_WORKS)
    assert recipe(get_profile("ci")) is not RECIPES["ci"]   # a copy: changing it leaves the table alone


def test_the_search_is_registered_and_the_cpu_recipe_is_its_recorded_choice():
    from course_lib import experiments
    from course_lib.experiments import char_lm
    from course_lib.tools import results

    assert experiments.resolve("char_lm") is char_lm.experiment
    record = results.recorded("char_lm", "cpu")
    assert record is not None, "data/results/char_lm_cpu.json is missing: python -m course_lib.experiments char_lm"
    chosen = record["results"]["chosen"]
    assert {k: RECIPES["cpu"][k] for k in chosen} == chosen
    best = min(r["tuning_loss"] for r in record["results"]["stage1_lr"] + record["results"]["stage2_shape"])
    assert math.isclose(record["results"]["seed_spread"]["losses"][0], best)


def test_the_reference_run_is_registered_and_runs_in_its_quick_form():
    from course_lib import experiments
    from course_lib.experiments import char_lm

    assert experiments.resolve("char_lm_reference") is char_lm.reference
    run = char_lm._reference_run("ci", 0, True)
    assert run["seed"] == 0 and 2.0 < run["heldout_loss"] < 6.0 and run["eval_step"][-1] == 4


def test_the_reference_record_was_made_at_the_cpu_recipe():
    """Lesson 04 prints the student's run beside this record: it must have trained with the same recipe."""
    from course_lib.tools import results

    record = results.recorded("char_lm_reference", "cpu")
    assert record is not None, "data/results/char_lm_reference_cpu.json is missing: bash scripts/record_all.sh char_lm_reference"
    assert record["results"]["recipe"] == RECIPES["cpu"], (
        f"char_lm_reference was recorded at {record['results']['recipe']}, the cpu recipe is now {RECIPES['cpu']}: "
        "re-make it with bash scripts/record_all.sh char_lm_reference")


def test_lesson_04_quotes_the_recorded_reference_and_search():
    """04's Going further compares the search's choice with the reference at it in prose: the numbers it quotes
    are today's records (the 24 × 64 reference it names is commit 19923f3's, kept in git history)."""
    import nbformat

    from course_lib.tools import results

    reference = results.recorded("char_lm_reference", "cpu")["results"]
    search = results.recorded("char_lm", "cpu")["results"]
    nb = nbformat.read(REPO / "notebooks" / "04_training_a_language_model.ipynb", as_version=4)
    prose = " ".join(" ".join(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    chosen = search["chosen"]
    loss = reference["heldout_loss"]
    assert (f"the one above chose {chosen['batch_size']} × {chosen['context']}" in prose and
            f"{chosen['batch_size']} × {chosen['context']} at the {loss['mean']:.3f} printed in section 5 "
            f"(seeds {loss['min']:.3f} to {loss['max']:.3f})" in prose), (
        "04's Going further quotes another search choice or reference loss than data/results/ holds: rewrite it")
