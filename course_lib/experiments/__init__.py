"""Recorded experiments: the multi-seed runs behind the lessons' tables, made by one command each.

A notebook has a few minutes; a claim such as "LoRA reaches full fine-tuning within 1 point" needs
several seeds, a learning rate chosen on a validation split and a paired interval, which take far
longer. So each such claim comes from a run of this script, saved by ``course_lib.tools.results`` with its
provenance (command, commit, hardware, versions, date, wall time) under ``data/results/``; the
notebook runs one seed live and shows the record beside it, labelled as recorded.

Command line::

    python -m course_lib.experiments list
    python -m course_lib.experiments finetuning [--profile cpu] [--seeds 3] [--quick]

``--quick`` is a seconds-long smoke form used by the tests: it writes to ``--out`` (a temporary file),
never to ``data/results/``. Each experiment is a function ``run(profile, *, seeds, quick) -> dict``
in this package's module of the same name; the table below only names it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

# name -> ("module:function", what it records, which notebook shows it)
EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "finetuning": ("course_lib.experiments.finetuning:experiment",
                   "probe, full fine-tuning and baselines; learning rates chosen on validation; seeds; "
                   "every pair compared (stats.compare: seeds and snippets resampled, three-way verdict)", "06_finetuning"),
    "lora": ("course_lib.experiments.lora:experiment",
             "LoRA (rank sweep), BitFit, probe and full fine-tuning on one task; seeds; every pair compared "
             "(stats.compare)",
             "07_lora"),
    "peft_family": ("course_lib.experiments.peft_family:experiment",
                    "full fine-tuning, probe, BitFit, adapters, prompt and prefix tuning, LoRA, AdaLoRA, QLoRA on one "
                    "task; learning rates on validation; seeds; each against full fine-tuning (stats.compare); memory split", "08_peft_family"),
    "lora_causal_lm": ("course_lib.experiments.lora_causal_lm:experiment",
                       "LoRA on SmolLM2-135M-Instruct vs zero-/few-shot prompting (seeds, stats.compare); "
                       "our LoRA step vs peft's, timed interleaved", "09_lora_causal_lm_gpu"),
    "scaling": ("course_lib.experiments.scaling:experiment",
                "IsoFLOP sweep of the tiny GPT on the synthetic language (Chinchilla Approach 2 and 3)",
                "05_scaling_laws"),
    "char_lm": ("course_lib.experiments.char_lm:experiment", "recipe search (learning rate, then batch × context at equal "
                "tokens) of the character-level Shakespeare GPT, chosen on two tuning works; seeds",
                "04_training_a_language_model"),
    "char_lm_reference": ("course_lib.experiments.char_lm:reference", "the course's GPT trained by the course's loop at "
                          "the profile's recipe on the lesson's split; seeds; exact held-out loss",
                          "04_training_a_language_model"),
    "positions": ("course_lib.experiments.positions:experiment", "tiny GPT with learned, sinusoidal, RoPE and no position "
                  "encoding; seeds; held-out loss at and past the training context", "03_transformer_block"),
}


class ExperimentError(RuntimeError):
    """An experiment could not run; the message says which and what to do."""


def resolve(name: str):
    """The function that runs experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ExperimentError(f"Unknown experiment {name!r}: choose one of {', '.join(sorted(EXPERIMENTS))}.")
    module_name, function_name = EXPERIMENTS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if function is None:
        raise ExperimentError(f"Experiment {name!r} names {EXPERIMENTS[name][0]}, which does not exist yet.")
    return function


def run(name: str, profile_name: str = "cpu", *, seeds: int = 3, quick: bool = False,
        out: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run experiment ``name`` and record it; returns ``(results, path written)``."""
    import course_lib
    from course_lib.tools import results as recorder
    from course_lib.tools.profiles import get_profile
    from course_lib.tools.timing import Stopwatch

    if quick and out is None:
        raise ExperimentError("--quick writes a smoke result that must not replace the record: pass --out FILE.")
    function = resolve(name)
    profile = get_profile(profile_name)
    course_lib.start(seed=0, quiet=True, profile=profile)
    with Stopwatch(profile.device) as watch:
        result = function(profile, seeds=seeds, quick=quick)
    result["wall_time_s"] = round(watch.seconds, 1)
    note = f"python -m course_lib.experiments {name}: {EXPERIMENTS[name][1]}"
    return result, recorder.record(name, profile, result, note=note, path=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments",
                                     description="Make the recorded multi-seed runs the lessons show.")
    parser.add_argument("name", help="an experiment, or 'list'")
    parser.add_argument("--profile", default="cpu", help="ci, cpu or gpu (default cpu)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke form (needs --out)")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of data/results/")
    args = parser.parse_args(argv)
    if args.name == "list":
        for name, (target, what, notebook) in EXPERIMENTS.items():
            print(f"{name:<12} {notebook:<22} {what}")
        return 0
    try:
        result, path = run(args.name, args.profile, seeds=args.seeds, quick=args.quick, out=args.out)
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: recorded in {result['wall_time_s']:.0f} s -> {path}")
    return 0

