"""Benchmarks: training throughput (tokens/s, MFU) and LoRA against ``peft`` (notebooks/10_scaling_out.ipynb).

    python -m course_lib.experiments.bench train|lora|all [--out data/results/gpu_benchmarks.json] [--quick]

``train``  trains the course's GPT (course_lib.parts.model) at GPT-2-small shape (12 layers, d_model 768,
           context 1024, vocab 50257) with the course's loop (``course_lib.parts.lm.train_lm``) in bf16 and
           reports tokens/s and MFU = tokens/s x 6N-style FLOPs per token / the GPU's dense bf16 peak
           (``course_lib.tools.timing.mfu`` and ``PEAK_BF16_FLOPS``), timed with deterministic algorithms off
           (``timing.timing_section``,
           recorded in the provenance). Then it adds the optimisations one at a time, each
           row on top of the one before: fused AdamW, flash attention (``F.scaled_dot_product_attention``
           instead of the course's explicit softmax(QKᵀ/√d)V), ``torch.compile``, a larger batch.
``lora``   one optimiser step of SmolLM2-135M (course asset "smollm2-135m-instruct") with LoRA from
           ``course_lib.parts.lora`` and with ``peft`` -- same model, batch, rank, targets and initial A -- and full
           fine-tuning for reference: step time and peak GPU memory side by side.

On a GPU the results go to ``data/results/gpu_benchmarks.json`` (the file notebook 10 shows). On a CPU,
or with ``--quick``, the same code runs in a reduced form (tiny shapes, a few steps, a small Llama built
in code) and writes only where ``--out`` says: a reduced run never replaces the GPU record.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from course_lib.parts.lm import TrainConfig, train_lm
from course_lib.parts.loop import LoopConfig, train
from course_lib.parts.attention import causal_mask, scaled_dot_product_attention
from course_lib.parts.model import CausalSelfAttention, flops_per_token, GPT, GPTConfig, param_count_formula
from course_lib.tools.assets import GGUF_FILES
from course_lib.tools.profiles import code_version, cpu_name, machine_load, package_versions, REPO
from course_lib.tools.timing import peak_flops, timing_section

__all__ = ["GPT2_SMALL", "ExplicitAttention", "use_explicit_attention", "bench_train", "bench_lora",
           "run", "main", "DEFAULT_OUT"]

DEFAULT_OUT = REPO / "data" / "results" / "gpu_benchmarks.json"

GPT2_SMALL = GPTConfig(vocab_size=50257, context=1024, n_layer=12, n_head=12, d_model=768)
GPT_TINY = GPTConfig(vocab_size=256, context=64, n_layer=2, n_head=2, d_model=64)

# SmolLM2-135M-Instruct's shape (read from the GGUF of the course asset; tests/test_bench.py compares)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, max_position_embeddings=8192)
LLAMA_TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                        max_position_embeddings=128)
SMOLLM2_GGUF = GGUF_FILES["smollm2-135m-instruct"]

# Full size vs reduced size of every knob
SIZES = {
    "full": dict(gpt=GPT2_SMALL, batch=8, big_batch=32, warmup=10, windows=2, lora_batch=8, lora_seq=512,
                 lora_warmup=3, lora_steps=10),
    "quick": dict(gpt=GPT_TINY, batch=4, big_batch=16, warmup=1, windows=1, lora_batch=2, lora_seq=32,
                  lora_warmup=1, lora_steps=2),
}


# ------------------------------------------------------------------------------------------------
# The course's explicit attention inside the GPT, for the "flash attention" row
# ------------------------------------------------------------------------------------------------


class ExplicitAttention(CausalSelfAttention):
    """The GPT's attention computed by ``course_lib.parts.attention`` (scores, mask, softmax, weights @ V),
    which materialises the (B, H, T, T) score matrix that flash attention never stores."""

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError("ExplicitAttention times training, which uses no KV cache; generate with the "
                             "GPT's own attention (use_explicit_attention only for the benchmark).")
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y, _ = scaled_dot_product_attention(q, k, v, mask=causal_mask(T, device=x.device))
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.resid_dropout(self.proj(y))


def use_explicit_attention(model: GPT) -> GPT:
    """Switch every attention layer of ``model`` to :class:`ExplicitAttention` (same weights), in place."""
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = ExplicitAttention
    return model


# ------------------------------------------------------------------------------------------------
# Helpers: device, memory, timing
# ------------------------------------------------------------------------------------------------


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset (None on a CPU: not measured)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------
# Training throughput
# ------------------------------------------------------------------------------------------------


def _train_variant(config: GPTConfig, *, batch: int, fused: bool, flash: bool, compile: bool,
                   warmup: int, windows: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Train a fresh GPT for ``warmup * (1 + windows)`` steps with the course's loop; time the last windows."""
    torch.manual_seed(seed)
    model = GPT(config)
    if not flash:
        use_explicit_attention(model)
    model = model.to(device)
    runner = torch.compile(model) if compile else model
    tokens = torch.randint(config.vocab_size, (max(20_000, 4 * batch * (config.context + 1)),),
                           generator=torch.Generator().manual_seed(seed))
    _reset_memory(device)
    history = train_lm(runner, tokens, None, TrainConfig(
        steps=warmup * (1 + windows), batch_size=batch, warmup_steps=0, log_every=warmup, eval_every=0,
        eval_batches=1, progress=False, seed=seed, fused=fused), device=device)
    # the first window holds the warm-up (CUDA kernels chosen, torch.compile compiling): left out
    speeds = history.tokens_per_s[1:]
    mfus = [m for m in history.mfu[1:] if m is not None]
    tokens_per_s = statistics.fmean(speeds)
    row = dict(batch_size=batch, fused_adamw=fused, flash_attention=flash, torch_compile=compile,
               tokens_per_s=tokens_per_s, step_ms=1e3 * batch * config.context / tokens_per_s,
               mfu=statistics.fmean(mfus) if mfus else None, peak_mem_gb=_peak_gb(device),
               final_train_loss=history.train_loss[-1])
    del model, runner, history
    if compile:
        torch._dynamo.reset()  # drop the compiled graphs before the next variant
    _reset_memory(device)
    return row


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def bench_train(device: torch.device, *, quick: bool, progress: bool = True) -> dict[str, Any]:
    """tokens/s and MFU of the course's GPT, adding one optimisation per row.

    A row that cannot run here (``torch.compile`` on a CPU) is kept with ``skipped=True``, a note, and no
    time, throughput or MFU; the rows after it run without that optimisation and say so in their note.
    ``speedup_vs_previous`` compares with the last row that was measured (named in ``speedup_vs`` when
    that is not the row just above); a row that ran out of GPU memory has no numbers either.
    """
    size = SIZES["quick" if quick else "full"]
    config: GPTConfig = size["gpt"]
    on_gpu = device.type == "cuda"
    ladder = [
        ("baseline: explicit attention, AdamW (foreach), eager", dict(fused=False, flash=False, compile=False)),
        ("+ fused AdamW", dict(fused=True, flash=False, compile=False)),
        ("+ flash attention (SDPA)", dict(fused=True, flash=True, compile=False)),
        ("+ torch.compile", dict(fused=True, flash=True, compile=True)),
        (f"+ batch {size['big_batch']}", dict(fused=True, flash=True, compile=True, batch=size["big_batch"])),
    ]
    rows = []
    for name, options in ladder:
        options = dict(options)
        batch = options.pop("batch", size["batch"])
        row: dict[str, Any] = dict(variant=name)
        if options["compile"] and not on_gpu:
            # compiling on a CPU needs a C++ toolchain and minutes: the row that adds torch.compile is not
            # run (no numbers: they would be the row above's, measured again); later rows run without it
            options["compile"] = False
            if not any(r.get("skipped") for r in rows):
                rows.append(dict(row, batch_size=batch, fused_adamw=options["fused"],
                                 flash_attention=options["flash"], torch_compile=False, skipped=True,
                                 tokens_per_s=None, step_ms=None, mfu=None, peak_mem_gb=None,
                                 note="skipped: torch.compile is not run on the CPU (reduced run)"))
                continue
            row["note"] = "measured without torch.compile (skipped on the CPU)"
        _say(f"[bench train] {name} ...", progress)
        out_of_memory = False
        try:
            row.update(_train_variant(config, batch=batch, warmup=size["warmup"], windows=size["windows"],
                                      device=device, **options))
        except RuntimeError as error:  # a too-large batch on a smaller GPU: record it, keep going
            if not _is_oom(error):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the traceback no longer holds the model
            _reset_memory(device)
            row.update(batch_size=batch, tokens_per_s=None, mfu=None, note="out of GPU memory")
        measured = [r for r in rows if r.get("tokens_per_s")]
        if measured and row.get("tokens_per_s"):  # against the last row that was measured
            row["speedup_vs_previous"] = row["tokens_per_s"] / measured[-1]["tokens_per_s"]
            if measured[-1] is not rows[-1]:
                row["speedup_vs"] = measured[-1]["variant"]
        rows.append(row)
    best = max((r for r in rows if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"])
    peak = peak_flops(device)
    flops = flops_per_token(config)
    return {
        "tiny_gpt": dict(tokens_per_s=best["tokens_per_s"], mfu=best["mfu"], variant=best["variant"],
                         config=config.to_dict(), n_params=param_count_formula(config, non_embedding=False),
                         flops_per_token=flops, peak_flops=peak),
        "train_ablation": rows,
    }


# ------------------------------------------------------------------------------------------------
# LoRA: course_lib.parts.lora vs peft vs full fine-tuning
# ------------------------------------------------------------------------------------------------


def _llama(model_name: str) -> tuple[torch.nn.Module, str]:
    """The base model in fp32: the real SmolLM2-135M, or a randomly initialised Llama of a given shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_name == "smollm2":
        from course_lib.tools import assets

        _, model = assets.load_causal_lm("smollm2-135m-instruct", dtype=torch.float32)
        return model, "SmolLM2-135M-Instruct (course asset smollm2-135m-instruct, de-quantised to fp32)"
    shape = {"smollm2-shape": SMOLLM2_SHAPE, "tiny": LLAMA_TINY_SHAPE}.get(model_name)
    if shape is None:
        raise ValueError(f"unknown LoRA bench model {model_name!r}: use 'smollm2', 'smollm2-shape' or 'tiny'.")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).float()
    what = "a Llama of SmolLM2-135M's shape, random weights" if model_name == "smollm2-shape" else \
        "a tiny Llama built in code (reduced run)"
    return model, what


def _lora_step_stats(model: torch.nn.Module, *, batch: torch.Tensor, warmup: int, steps: int,
                     device: torch.device) -> dict[str, Any]:
    """``warmup + steps`` steps of the course's loop on the same batch (constant learning rate, AdamW with
    weight decay 0.01 on matrices); the median time of the last ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    config = LoopConfig(steps=warmup + steps, lr=1e-4, schedule="constant", weight_decay=0.01, betas=(0.9, 0.999),
                        grad_clip=None, time_steps=True, progress=False, log_every=warmup + steps)
    history = train(model, itertools.repeat(batch), lambda m, b: m(input_ids=b, labels=b).loss, config,
                    device=device)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(p.numel() * p.element_size() for p in params)  # their gradients (freed by zero_grad)
    state += history.optimizer_bytes
    return dict(step_ms=1e3 * statistics.median(history.step_seconds[warmup:]), losses=history.losses,
                peak_mem_gb=_peak_gb(device), trainable_params=sum(p.numel() for p in params),
                weights_grads_adam_gb=state / 1e9)


def bench_lora(device: torch.device, *, quick: bool, model_name: str | None = None, r: int = 8,
               alpha: float = 16, targets: tuple[str, ...] = ("q_proj", "v_proj"), progress: bool = True
               ) -> dict[str, Any]:
    """One LoRA step with course_lib.parts.lora and with peft (and full fine-tuning) on the same model and batch."""
    from peft import LoraConfig, get_peft_model

    from course_lib.parts.lora import apply_lora, lora_layers

    size = SIZES["quick" if quick else "full"]
    model_name = model_name or ("tiny" if quick else "smollm2")
    base, described = _llama(model_name)
    vocab = base.config.vocab_size
    batch = torch.randint(vocab, (size["lora_batch"], size["lora_seq"]),
                          generator=torch.Generator().manual_seed(0)).to(device)
    common = dict(batch=batch, warmup=size["lora_warmup"], steps=size["lora_steps"], device=device)
    rows: dict[str, dict[str, Any]] = {}

    _say("[bench lora] course_lib.parts.lora ...", progress)
    _reset_memory(device)
    model = apply_lora(copy.deepcopy(base), list(targets), r=r, alpha=alpha).to(device)
    initial_A = {name: layer.lora_A.detach().clone() for name, layer in lora_layers(model).items()}
    rows["course_lora"] = _lora_step_stats(model, **common)
    del model

    _say("[bench lora] peft ...", progress)
    _reset_memory(device)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft calls a transformers method that v5 renamed
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(copy.deepcopy(base), config).to(device)
    with torch.no_grad():  # start from the very same A as the course's LoRA (B = 0 in both)
        for name, module in model.named_modules():
            inner = name.removeprefix("base_model.model.")
            if inner in initial_A:
                module.lora_A["default"].weight.copy_(initial_A[inner])
    rows["peft"] = _lora_step_stats(model, **common)
    del model

    _say("[bench lora] full fine-tuning ...", progress)
    _reset_memory(device)
    model = copy.deepcopy(base).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    rows["full_finetune"] = _lora_step_stats(model, **common)
    del model, base
    _reset_memory(device)

    course, peft_row = rows["course_lora"], rows["peft"]
    return {"lora": dict(
        model=described, batch_size=size["lora_batch"], seq_len=size["lora_seq"], r=r, alpha=alpha,
        target_modules=list(targets), steps_timed=size["lora_steps"],
        vs_peft_step_time_ratio=course["step_ms"] / peft_row["step_ms"],
        peak_mem_gb=course["peak_mem_gb"], peft_peak_mem_gb=peft_row["peak_mem_gb"],
        full_peak_mem_gb=rows["full_finetune"]["peak_mem_gb"],
        loss_max_abs_diff_vs_peft=max(abs(a - b) for a, b in zip(course["losses"], peft_row["losses"])),
        rows=rows)}


# ------------------------------------------------------------------------------------------------
# Provenance and the command line
# ------------------------------------------------------------------------------------------------


def _provenance(device: torch.device, argv: list[str], reduced: bool, deterministic: bool) -> dict[str, Any]:
    """Where and how the numbers were measured; ``deterministic`` is torch's deterministic-algorithms
    flag while they were timed."""
    hardware: dict[str, Any] = dict(platform=platform.platform(), cpu=cpu_name(),
                                    cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.update(gpu=props.name, gpu_memory_gb=props.total_memory / 1e9,
                        compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return dict(command="python -m course_lib.experiments.bench " + " ".join(argv),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                versions=package_versions(), hardware=hardware, reduced=reduced, commit=code_version(),
                deterministic_algorithms=deterministic, **machine_load())


def run(what: str, *, device: torch.device | str | None = None, quick: bool = False,
        lora_model: str | None = None, argv: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the benchmarks (``what`` = "train", "lora" or "all") and return the result dict.

    ``progress`` prints one line per variant to stderr as it starts.
    """
    if what not in ("train", "lora", "all"):
        raise ValueError(f"what must be 'train', 'lora' or 'all', got {what!r}.")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    reduced = quick or device.type != "cuda"
    result: dict[str, Any] = dict(
        device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, reduced=reduced)
    with timing_section():  # the fast kernels, whatever course_lib.start() chose for reproducibility
        deterministic = torch.are_deterministic_algorithms_enabled()
        if what in ("train", "all"):
            result.update(bench_train(device, quick=reduced, progress=progress))
            if device.type != "cuda":
                result["tiny_gpt"]["mfu"] = None  # MFU is defined against a GPU's bf16 peak
        if what in ("lora", "all"):
            result.update(bench_lora(device, quick=reduced, model_name=lora_model, progress=progress))
    result["provenance"] = _provenance(device, argv if argv is not None else [what], reduced, deterministic)
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` to ``out``, keeping sections of an earlier run on the same device that this
    run did not redo (``train`` then ``lora`` build up one file)."""
    merged = result
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("device_name") == result["device_name"] and old.get("reduced") == result["reduced"]:
            merged = {**old, **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "lora", "all"])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file to write (default on a GPU: {DEFAULT_OUT.relative_to(REPO)}; "
                             f"a reduced run writes only where --out says)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few steps (always on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--lora-model", choices=["smollm2", "smollm2-shape", "tiny"], default=None,
                        help="smollm2: the course asset (default); smollm2-shape: same shape, random weights, "
                             "no download; tiny: the reduced model")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    reduced = args.quick or device.type != "cuda"
    out = args.out if args.out is not None or reduced else DEFAULT_OUT
    if out is not None and reduced and out.resolve() == DEFAULT_OUT.resolve():
        print(f"error: a reduced run ({device.type}{', --quick' if args.quick else ''}) does not go into "
              f"{DEFAULT_OUT.relative_to(REPO)}, the GPU record: pass another --out.", file=sys.stderr)
        return 2
    result = run(args.what, device=device, quick=args.quick, lora_model=args.lora_model, argv=argv)
    summary = {k: result[k] for k in ("device", "device_name", "tiny_gpt", "lora") if k in result}
    if "lora" in summary:
        summary["lora"] = {k: v for k, v in summary["lora"].items() if k != "rows"}
    print(json.dumps(summary, indent=1, default=str))
    if out is not None:
        _write(result, out)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
