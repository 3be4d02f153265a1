"""The recorded comparison of position encodings (lesson 03): which one learns best, and which can read past
its training context.

Explained in notebooks/03_transformer_block.ipynb ("Positions"). ``python -m course_lib.experiments positions``
trains the tiny GPT with each encoding of ``course_lib.parts.positions`` on Shakespeare's characters, several
seeds each, the same batches for every encoding, and judges all of them on the same held-out windows.
"""

from __future__ import annotations

from typing import Any

import torch

from course_lib.experiments.cache import run_load
from course_lib.parts.positions import POSITION_KINDS
from course_lib.tools.timing import Stopwatch


def char_data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Shakespeare as character ids: (train ids, held-out ids, characters), split by work (data.py).

    The vocabulary is the training split's characters; a held-out character outside it (there are
    none in the course's split) would map to id 0.
    """
    from course_lib.tools.data import shakespeare_split

    train_text, val_text = shakespeare_split()
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    return encode(train_text), encode(val_text), chars



def experiment_settings(profile: Any) -> dict[str, Any]:
    """The model and training sizes of the positions experiment for one profile.

    Kept small on purpose: 4 encodings × several seeds must fit a CPU recording, and the notebook
    trains one of these runs live.
    """
    sizes = profile.pick(
        ci=dict(d_model=32, n_layer=2, n_head=4, context=32, batch_size=8, steps=40, eval_windows=8),
        cpu=dict(d_model=64, n_layer=2, n_head=4, context=64, batch_size=16, steps=800, eval_windows=128),
        gpu=dict(d_model=128, n_layer=4, n_head=4, context=128, batch_size=32, steps=3000, eval_windows=256))
    sizes.update(lr=2e-3, warmup_steps=50 if sizes["steps"] >= 500 else 5, weight_decay=0.1,
                 eval_lengths=[sizes["context"], 2 * sizes["context"], 4 * sizes["context"]])
    return sizes



@torch.no_grad()
def per_position_loss(model: torch.nn.Module, tokens: torch.Tensor, length: int, windows: int,
                      seed: int = 1234, span: int | None = None) -> torch.Tensor:
    """Cross-entropy (nats) at every position of ``windows`` fixed windows of ``length`` tokens: (windows, length).

    The windows are drawn with ``seed`` among the starts that leave room for ``span`` tokens (default ``length``),
    so every model, and with the same ``span`` every length, is judged on the same text.
    """
    span = length if span is None else span
    if span < length:
        raise ValueError(f"span ({span}) must be at least the window length ({length}).")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - span - 1, (windows,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    device = next(model.parameters()).device
    x, y = tokens[index].to(device), tokens[index + 1].to(device)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(x)
    finally:
        model.train(was_training)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                             reduction="none").view(windows, length).cpu()



def train_and_evaluate(kind: str, settings: dict[str, Any], seed: int, train_ids: torch.Tensor,
                       val_ids: torch.Tensor, vocab_size: int, device: torch.device | str = "cpu",
                       progress: bool = False) -> dict[str, Any]:
    """Train one tiny GPT with position encoding ``kind`` and measure its held-out loss per position.

    Every length is judged on the same windows: windows of the longest length are drawn once (the same starts for
    every encoding and seed), and the loss at length L is that of their first L tokens; a causal model predicts
    those exactly as it would in a window of L tokens. Returns ``{"loss_at": {length: mean loss},
    "window_loss": {length: per-window means}, "per_position": {length: mean loss at each position},
    "train_seconds": ...}``; lengths past the training context are skipped for ``"learned"`` (its table ends there).
    """
    from course_lib.parts.model import GPT, GPTConfig
    from course_lib.parts.lm import train_lm

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, context=settings["context"], n_layer=settings["n_layer"],
                       n_head=settings["n_head"], d_model=settings["d_model"], position=kind)
    model = GPT(config).to(device)
    watch = Stopwatch(device).start()
    train_lm(model, train_ids, None, steps=settings["steps"], batch_size=settings["batch_size"],
             lr=settings["lr"], warmup_steps=settings["warmup_steps"], weight_decay=settings["weight_decay"],
             seed=seed, eval_every=0, progress=progress, amp="none")
    seconds = watch.stop()
    lengths = [n for n in settings["eval_lengths"] if not (kind == "learned" and n > config.context)]
    losses = per_position_loss(model, val_ids, max(lengths), settings["eval_windows"],
                               span=max(settings["eval_lengths"]))
    out: dict[str, Any] = {"loss_at": {}, "window_loss": {}, "per_position": {}, "train_seconds": round(seconds, 1),
                           "load_average_1min": run_load()}
    for length in lengths:
        first = losses[:, :length]
        out["loss_at"][str(length)] = float(first.mean())
        out["window_loss"][str(length)] = [round(float(v), 5) for v in first.mean(dim=1)]
        out["per_position"][str(length)] = [round(float(v), 4) for v in first.mean(dim=0)]
    return out



def _interval(a: Any, b: Any) -> dict[str, Any]:
    """A − B in nats, paired over seeds and windows (both resampled), with the per-seed gaps."""
    import numpy as np

    from course_lib.experiments.stats import paired_bootstrap_gap_seeds

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap, low, high = paired_bootstrap_gap_seeds(a, b, rng=np.random.default_rng(0))
    return {"gap": gap, "low": low, "high": high, "per_seed": (a.mean(1) - b.mean(1)).tolist()}


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """``python -m course_lib.experiments positions``: every encoding × ``seeds`` seeds, same data order.

    Runs of the same seed see the same batches in the same order, and every run and every length is judged on
    the same held-out windows, so all comparisons are paired over seeds and windows
    (:func:`course_lib.experiments.stats.paired_bootstrap_gap_seeds`): ``gaps`` between encodings at each length,
    ``length_changes`` of each encoding from the training context T to each longer length. One learning rate
    serves all encodings.
    """
    import numpy as np

    settings = experiment_settings(profile)
    if quick:
        settings.update(steps=5, warmup_steps=1, eval_windows=2)
        seeds = min(seeds, 2)
    train_ids, val_ids, chars = char_data()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in POSITION_KINDS}
    for seed in range(seeds):
        for kind in POSITION_KINDS:
            runs[kind].append(train_and_evaluate(kind, settings, seed, train_ids, val_ids, len(chars),
                                                 device=profile.device))
    summary: dict[str, Any] = {}
    for kind, per_seed in runs.items():
        summary[kind] = {length: {"mean": float(np.mean([r["loss_at"][length] for r in per_seed])),
                                  "per_seed": [r["loss_at"][length] for r in per_seed]}
                         for length in per_seed[0]["loss_at"]}

    def windows(kind: str, length: str) -> list[list[float]]:
        return [r["window_loss"][length] for r in runs[kind]]

    gaps: dict[str, Any] = {}
    for length in map(str, settings["eval_lengths"]):
        kinds = [k for k in POSITION_KINDS if length in runs[k][0]["loss_at"]]
        for i, a in enumerate(kinds):
            for b in kinds[i + 1:]:
                gaps[f"{length}: {a} - {b}"] = _interval(windows(a, length), windows(b, length))
    context = str(settings["context"])
    length_changes = {kind: {length: _interval(windows(kind, length), windows(kind, context))
                             for length in runs[kind][0]["loss_at"] if length != context}
                      for kind in POSITION_KINDS}
    return {"settings": settings, "seeds": seeds, "vocab_size": len(chars), "summary": summary,
            "gaps": gaps, "length_changes": length_changes, "runs": runs}
