"""Re-run one recorded configuration of every caller of the training loop and print what it computed.

Made for issue 22 ("one training loop"): run it before and after a change to the loop, on one thread, and
compare the two JSON files (``--compare A B``): every number must be bit-identical where the order of
operations did not change. Each entry names the record its configuration comes from.

    OMP_NUM_THREADS=1 python scripts/loop_equivalence.py --out before.json [--only lm_recipe,...]
    python scripts/loop_equivalence.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state dict (names sorted): equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_digest(weights: dict) -> str:
    h = hashlib.sha256()
    for name, t in sorted(weights.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _profile(name: str):
    import course_lib
    from course_lib.tools.profiles import get_profile

    return course_lib.start(seed=0, quiet=True, profile=get_profile(name))


# ---------------------------------------------------------------------------------------------- callers

def lm_recipe() -> dict:
    """04's character-level GPT at the cpu recipe, seed 0 (data/results/char_lm_cpu.json, stage 1, lr 4e-3)."""
    from course_lib.experiments import char_lm

    profile = _profile("cpu")
    train_ids, tune_ids, vocab = char_lm._search_data(quick=False)
    out = char_lm._run(profile, train_ids, tune_ids, vocab, context=64, batch_size=24, steps=2000, lr=4e-3,
                       warmup_steps=100, seed=0, quick=False)
    return {k: out[k] for k in ("final_train_loss", "tuning_loss")}


def lm_paths() -> dict:
    """A small GPT through every path of the LM loop: accumulation, logging, evaluation, cosine schedule."""
    from course_lib.parts.model import GPT, GPTConfig
    from course_lib.parts.lm import TrainConfig, train_lm

    _profile("ci")
    tokens = torch.randint(0, 40, (6000,), generator=torch.Generator().manual_seed(0))
    val = torch.randint(0, 40, (1500,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context=16, n_layer=2, n_head=2, d_model=32, dropout=0.1))
    h = train_lm(model, tokens, val, TrainConfig(steps=30, batch_size=4, grad_accum=2, warmup_steps=5,
                                                 log_every=4, eval_every=10, eval_batches=3, progress=False))
    return dict(train_loss=h.train_loss, lr=h.lr, val_loss=h.val_loss, eval_train_loss=h.eval_train_loss,
                step=h.step, weights=digest(model))


def positions() -> dict:
    """03's position-encoding run: RoPE, seed 0 (data/results/positions_cpu.json)."""
    from course_lib.experiments import positions as pos

    profile = _profile("cpu")
    train_ids, val_ids, chars = pos.char_data()
    out = pos.train_and_evaluate("rope", pos.experiment_settings(profile), 0, train_ids, val_ids, len(chars))
    return dict(loss_at=out["loss_at"])


def scaling() -> dict:
    """05's IsoFLOP sweep: the smallest model of the smallest budget, seed 0 (data/results/scaling_cpu.json)."""
    from course_lib.experiments import scaling as sc

    _profile("cpu")
    setup = sc.SWEEP_SETUP
    lang = sc.sweep_language(setup)
    train_tokens, val_tokens = lang.train_val(setup["n_train"], setup["n_val"], seed=setup["data_seed"])
    entry = {"C_budget": 1e10, "d_model": 8, "n_layer": 1, "steps": 1280}
    torch.set_num_threads(1)
    out = sc._train_one(entry, 0, train_tokens, val_tokens, vocab_size=lang.vocab_size, batch_size=setup["batch_size"],
                        context=setup["context"], lr=setup["lr"], device="cpu", eval_batches=setup["eval_batches"])
    return dict(val_loss=out["val_loss"])


def _sentiment():
    from course_lib.tools.data import load_sentiment

    return load_sentiment("movies")


def classifier() -> dict:
    """06's full fine-tuning at the chosen learning rate, seed 0 (data/results/finetuning_cpu.json)."""
    from course_lib.experiments import finetuning as ft
    from course_lib.parts import classifier as cls
    from course_lib.tools.data import take

    profile = _profile("cpu")
    sizes = ft.finetuning_sizes(profile)
    movies = _sentiment()
    val = take(movies["validation"], sizes["n_val"])
    test = take(movies["test"], sizes["n_test"])
    tokenizer, encoder = cls.load_encoder(profile)
    pool = take(movies["train"], sizes["n_label"], seed=0)
    model, run = ft.finetune_once(encoder, tokenizer, pool, val, lr=1e-4, seed=0, sizes=sizes)
    predictions = cls.evaluate(model, tokenizer, test, max_length=sizes["max_length"])["predictions"]
    return dict(best_val_accuracy=run.best_val_accuracy, best_step=run.best_step, steps=run.steps,
                history=[{k: v for k, v in row.items() if k != "lr"} for row in run.history],
                test_accuracy=float((predictions.numpy() == np.array(test["label"])).mean()), weights=digest(model))


def fixed_steps() -> dict:
    """07's LoRA r=8 and linear probe at the chosen learning rates, seed 0 (data/results/lora_cpu.json)."""
    from course_lib.experiments import lora as lx
    from course_lib.parts import classifier as cls
    from course_lib.parts import lora
    from course_lib.tools.data import take

    profile = _profile("cpu")
    sizes = lx.lora_sizes(profile)
    movies = _sentiment()
    tokenizer, encoder = cls.load_encoder(profile)
    pool = take(movies["train"], sizes["n_train"], seed=0)
    test = take(movies["test"], sizes["n_test"])
    steps = math.ceil(sizes["epochs"] * len(pool) / sizes["batch_size"])
    import copy

    torch.manual_seed(0)
    model = cls.SentenceClassifier(copy.deepcopy(encoder))
    model = lora.apply_lora(model, ["query", "value"], r=8, alpha=16, trainable_extra=["head"])
    out = cls.train_fixed_steps(model, tokenizer, pool, lr=3e-3, steps=steps, batch_size=sizes["batch_size"],
                               max_length=sizes["max_length"], seed=0)
    test_acc = cls.evaluate(model, tokenizer, test, max_length=sizes["max_length"])["accuracy"]
    torch.manual_seed(0)
    probe = cls.SentenceClassifier(copy.deepcopy(encoder)).freeze_encoder()
    e_pool = cls.embed(encoder, tokenizer, list(pool["text"]), max_length=sizes["max_length"])
    probe_out = cls.train_head_on_embeddings(probe, e_pool, pool["label"], lr=3e-2, steps=steps,
                                            batch_size=sizes["batch_size"], seed=0)
    return dict(lora_final_loss=out["final_loss"], lora_test_accuracy=test_acc, lora_weights=digest(model),
                probe_final_loss=probe_out["final_loss"], probe_weights=digest(probe.head))


def peft() -> dict:
    """08's adapters and AdaLoRA at the recorded learning rates, seed 0 (data/results/peft_family_cpu.json)."""
    from course_lib.experiments import peft_family as px

    profile = _profile("cpu")
    sizes = px.settings(profile)
    tokenizer, encoder = px.load_classifier_parts(profile)
    data = px.task_data(sizes)
    out = {}
    for method, lr in (("adapters", 3e-3), ("AdaLoRA", 1e-2)):
        model, row = px.run_method(method, encoder, tokenizer, data, sizes, lr=lr, seed=0)
        out[method] = dict(final_loss=row["final_loss"], losses=row["losses"], validation_accuracy=row["validation_accuracy"],
                           test_accuracy=row["test_accuracy"], weights=digest(model))
    return out


def causal() -> dict:
    """09's LoRA on SmolLM2 at the cpu run's configuration, seed 0 (notebook 09; no record exists yet)."""
    from course_lib.experiments import lora_causal_lm as lx
    from course_lib.parts import causal_lm as clm
    from course_lib.parts import lora
    from course_lib.tools import assets

    profile = _profile("cpu")
    config = lx.run_config("cpu")
    tokenizer, base = assets.load_causal_lm("smollm2-135m-instruct")
    movies = _sentiment()
    train = movies["train"].shuffle(seed=0).select(range(config.n_train))
    examples = [clm.encode(tokenizer, t, y) for t, y in zip(train["text"], train["label"])]
    torch.manual_seed(0)
    model = lora.apply_lora(base, list(clm.TARGETS), r=config.r, alpha=config.alpha, dropout=config.dropout)
    n_frozen = sum(p.numel() for p in base.parameters())
    out = clm.train_lora(model, examples, tokenizer, config, device=profile.device, seed=0, n_frozen=n_frozen)
    adapter = {k: v for k, v in model.state_dict().items() if "lora" in k}
    return dict(losses=out["losses"], adapter=weights_digest(adapter))


def ddp() -> dict:
    """10's data parallelism: one process on the whole batch, and two processes under torchrun."""
    import tempfile

    from course_lib.distributed import ddp as d

    _profile("ci")
    spec = d.DDPSpec()
    weights, losses = d.train_single(spec, 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = d.launch(Path(tmp) / "ddp", spec=spec)
        multi = d.load_weights(Path(tmp) / "ddp", 0)
    return dict(single_losses=losses, single_weights=weights_digest(weights), ddp_losses=run["losses"],
                ddp_max_abs_difference=d.max_abs_difference(weights, multi))


CALLERS = dict(lm_paths=lm_paths, scaling=scaling, positions=positions, ddp=ddp, peft=peft, fixed_steps=fixed_steps,
               classifier=classifier, causal=causal, lm_recipe=lm_recipe)


def compare(a: dict, b: dict) -> int:
    different = 0
    for name in a:
        if name not in b:
            print(f"{name}: only in the first file")
            continue
        same = json.dumps(a[name]["result"], sort_keys=True) == json.dumps(b[name]["result"], sort_keys=True)
        different += not same
        print(f"{name:<12} {'bit-identical' if same else 'DIFFERENT'}  ({a[name]['seconds']:.0f} s -> {b[name]['seconds']:.0f} s)")
        if not same:
            print("   before:", json.dumps(a[name]["result"], sort_keys=True)[:600])
            print("   after: ", json.dumps(b[name]["result"], sort_keys=True)[:600])
    return different


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="")
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        return 1 if compare(*(json.loads(p.read_text()) for p in args.compare)) else 0
    torch.set_num_threads(1)
    names = [n for n in CALLERS if not args.only or n in args.only.split(",")]
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    for name in names:
        start = time.perf_counter()
        result = CALLERS[name]()
        results[name] = dict(result=result, seconds=time.perf_counter() - start)
        print(f"{name}: {time.perf_counter() - start:.0f} s {json.dumps(result)[:300]}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
