"""How fast the course's model and loop are, against an anchor: two ratios on one CPU thread.

    python -m course_lib.experiments.speed [--steps 40] [--windows 5] [--nanogpt PATH/model.py]

1. **Model step / anchor step.** One training step (forward, backward, AdamW) of ``course_lib.parts.model.GPT``
   against the same step of a GPT written the way nanoGPT's ``model.py`` writes it (Karpathy; fused LayerNorm,
   one QKV projection, ``scaled_dot_product_attention``, GELU MLP, tied head, no input checks) at nanoGPT's
   CPU shape: 4 layers, 4 heads, d_model 128, context 64, batch 12 (its README's shakespeare-char recipe for
   a laptop). Both models get the same weights (the anchor is built with the course's parameter names and
   loads its state dict), the same batches and the same AdamW; the two are timed interleaved, window by
   window, and the ratio is the median of the per-window ratios. ``--nanogpt`` times nanoGPT's own
   ``model.py`` from a checkout instead of the anchor written here (its weights are its own; the shape and
   batches are the same).
2. **Loop / bare step.** The course's loop (``course_lib.parts.lm.train_lm``: batches, schedule, clipping,
   logging, progress bar off) against the same steps written as a bare ``for`` loop with the same batches,
   clipping and optimiser, on the course's model: how much the loop adds.

Explained in notebooks/04_training_a_language_model.ipynb (Going further, "How fast are the model and the loop?"),
which also times the student's own GPT of lesson 03 against the course's (``anchor_class``); the README quotes both
ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.parts.lm import TrainConfig, get_batch, train_lm
from course_lib.parts.loop import make_optimizer
from course_lib.parts.model import GPT, GPTConfig
from course_lib.tools.profiles import machine_load
from course_lib.tools.timing import Stopwatch

__all__ = ["NANOGPT_CPU", "AnchorGPT", "model_vs_anchor", "loop_vs_bare", "main"]

# nanoGPT's README, "I only have a macbook": --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
NANOGPT_CPU = dict(config=GPTConfig(vocab_size=65, context=64, n_layer=4, n_head=4, d_model=128), batch=12)


class _AnchorBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc, self.mlp.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.attn.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, d)
        x = x + self.attn.proj(y)
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln_2(x))))


class AnchorGPT(nn.Module):
    """nanoGPT's architecture, written plainly, with the course's parameter names (so the course's weights
    load into it): what a model step costs without a course's checks and options."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(_AnchorBlock(config.d_model, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _nanogpt(path: Path, config: GPTConfig) -> nn.Module:
    """nanoGPT's own GPT from ``path`` (its model.py), at ``config``'s shape, with biases and no dropout."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no nanoGPT model.py at {path}: pass the model.py of a nanoGPT checkout.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT(module.GPTConfig(block_size=config.context, vocab_size=config.vocab_size,
                                       n_layer=config.n_layer, n_head=config.n_head, n_embd=config.d_model,
                                       dropout=0.0, bias=True))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, loss = model(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _window(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, steps: int) -> float:
    with Stopwatch() as watch:
        for batch in itertools.islice(itertools.cycle(batches), steps):
            _step(model, optimizer, batch)
    return watch.seconds / steps


def model_vs_anchor(*, steps: int = 40, windows: int = 5, nanogpt: Path | None = None, seed: int = 0,
                    anchor_class: type | None = None) -> dict[str, Any]:
    """Seconds per training step of the course's GPT and of the anchor, interleaved; their ratio.

    ``anchor_class`` times another GPT with the course's parameter names instead (lesson 04 times the student's
    GPT of lesson 03, built with the course's weights, against the course's)."""
    config, batch = NANOGPT_CPU["config"], NANOGPT_CPU["batch"]
    torch.manual_seed(seed)
    ours = GPT(config)
    if anchor_class is not None:
        anchor, what = anchor_class(config), f"{anchor_class.__module__}.{anchor_class.__qualname__} (the course's weights)"
        anchor.load_state_dict(ours.state_dict())
    elif nanogpt is not None:
        anchor, what = _nanogpt(Path(nanogpt), config), f"nanoGPT's model.py ({nanogpt})"
    else:
        anchor, what = AnchorGPT(config), "AnchorGPT (nanoGPT's architecture written here, the course's weights)"
        anchor.load_state_dict(ours.state_dict())
    tokens = torch.randint(config.vocab_size, (20_000,), generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    batches = [get_batch(tokens, batch, config.context, generator) for _ in range(steps)]
    models = {"course": ours, "anchor": anchor}
    optimizers = {name: make_optimizer(m, 1e-3) for name, m in models.items()}
    for name, m in models.items():                       # warm-up: allocations, the optimiser's state
        _window(m, optimizers[name], batches, 3)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(windows):
        for name, m in models.items():
            times[name].append(_window(m, optimizers[name], batches, steps))
    ratios = [c / a for c, a in zip(times["course"], times["anchor"])]
    return dict(anchor=what, config=config.to_dict(), batch=batch, steps_per_window=steps, windows=windows,
                course_ms=1e3 * statistics.median(times["course"]), anchor_ms=1e3 * statistics.median(times["anchor"]),
                ratio=statistics.median(ratios), ratios=ratios,
                parameters={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()})


def loop_vs_bare(*, steps: int = 40, windows: int = 5, seed: int = 0) -> dict[str, Any]:
    """Seconds per step of the course's loop and of a bare loop doing the same steps; their ratio."""
    config, batch = NANOGPT_CPU["config"], NANOGPT_CPU["batch"]
    tokens = torch.randint(config.vocab_size, (20_000,), generator=torch.Generator().manual_seed(seed))

    def bare() -> float:
        torch.manual_seed(seed)
        model = GPT(config)
        optimizer = make_optimizer(model, 1e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        with Stopwatch() as watch:
            for _ in range(steps):
                _step(model, optimizer, get_batch(tokens, batch, config.context, generator))
        return watch.seconds / steps

    def loop() -> float:
        torch.manual_seed(seed)
        model = GPT(config)
        history = train_lm(model, tokens, None, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, eval_every=0,
                                                            eval_batches=1, log_every=steps, progress=False, seed=seed))
        return history.seconds / steps

    bare(), loop()                                       # warm-up
    times: dict[str, list[float]] = {"loop": [], "bare": []}
    for _ in range(windows):
        times["loop"].append(loop())
        times["bare"].append(bare())
    ratios = [lp / b for lp, b in zip(times["loop"], times["bare"])]
    return dict(steps_per_window=steps, windows=windows, loop_ms=1e3 * statistics.median(times["loop"]),
                bare_ms=1e3 * statistics.median(times["bare"]), ratio=statistics.median(ratios), ratios=ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed window (default 40)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per model (default 5)")
    parser.add_argument("--nanogpt", type=Path, default=None, help="time the model.py of a nanoGPT checkout")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = dict(threads=torch.get_num_threads(), load=machine_load(),
                  model=model_vs_anchor(steps=args.steps, windows=args.windows, nanogpt=args.nanogpt),
                  loop=loop_vs_bare(steps=args.steps, windows=args.windows))
    model, loop = result["model"], result["loop"]
    print(json.dumps(result, indent=1, default=str))
    print(f"model step / anchor step: {model['ratio']:.3f} ({model['course_ms']:.1f} ms vs {model['anchor_ms']:.1f} ms, "
          f"median of {model['windows']} interleaved windows)")
    print(f"loop step / bare step:    {loop['ratio']:.3f} ({loop['loop_ms']:.1f} ms vs {loop['bare_ms']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
