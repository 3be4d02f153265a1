"""course_lib: the helper library of the course "From attention math to LoRA on a GPU".

Its folders are its layers; a module imports only from its own layer and the layers below it (a contract
test, tests/test_layers.py, keeps it so). Each module holds one idea and names the notebook that explains it.

tools/ -- the course's machinery every lesson leans on (the bottom layer)
    profiles           ci / cpu / gpu sizes, device, seeding (00)
    assets, index      pinned models and corpora from the package index, checked and cached (00)
    cachedir           what a cached asset must hold, and the derived SmolLM2 copy's pins (00)
    data               datasets built from the assets: Shakespeare (04), sentiment (06-09)
    results            recorded runs with their provenance (03-09)
    timing             the one timer (waits for the GPU), MFU and the GPUs' peaks (04, 10)
    plots, widgets     figures and explorers (01), running a notebook headless
parts/ -- what the lessons build (students write these; checks compare with them)
    attention          scaled dot-product and multi-head attention (01)
    losses, gradcheck  softmax, cross-entropy and its gradient; finite differences (02)
    positions, model   sinusoidal and rotary positions; a tiny GPT with a KV cache (03)
    bpe                byte-level BPE from scratch (04)
    loop, checkpoint   the one training loop every lesson trains with; its checkpoints (04)
    lm                 the loop with a language model's batches, held-out loss (04; 03, 05, 10)
    synthetic, scaling a language with a known entropy rate; power-law and Chinchilla fits (05)
    classifier         encoder classifiers, metrics, fine-tuning through the loop (06, 07)
    lora               LoRA from scratch (07; 08, 09)
    peft_family, quant BitFit, adapters, prompt and prefix tuning, AdaLoRA; NF4 and QLoRA (08)
    causal_lm          LoRA on a causal chat model: JSON task, exact metric (09)
distributed/ -- training on several processes
    launch             torchrun, process groups with timeouts, one sentence per failure (10, 11)
    ddp                data parallelism, the cost of an all-reduce, memory per GPU (10)
    parallel           lesson 11's parts on several processes
    tensor_parallel, pipeline, sharded, activation_memory   Megatron, GPipe, ZeRO/FSDP2, recomputation (11)
    data_parallel, megatron_mlp   the reference scripts of exercises 10.2 and 11.1 (torchrun runs them)
experiments/ -- the recorded runs behind the lessons' tables (python -m course_lib.experiments NAME)
    stats              paired bootstrap intervals over examples and seeds (06; 03, 07-09)
    cache              the run cache of long records
    positions, char_lm, scaling, scaling_lab, finetuning, lora, peft_family, lora_causal_lm   (03-09)
    bench, speed       GPU throughput and LoRA vs peft (10); the model and loop against an anchor (04)
checks/ -- exercise checks that name the mistake in one sentence, and their hints (every lesson)
editions, grading -- the student edition, and the class's nbgrader assignment and gradebook (00)
"""

from __future__ import annotations

__version__ = "0.1.0"


def start(seed: int = 0, *, quiet: bool = False, profile=None, deterministic: bool = True):
    """What the first code cell of every notebook calls: pick the profile, seed everything, and print
    the profile and the library versions. Returns the :class:`~course_lib.tools.profiles.Profile`.

    Scripts that choose the profile themselves (``course_lib.experiments``) pass it as ``profile``.
    Deterministic algorithms are on (``deterministic=True``) so that checked numbers repeat; a cell
    that times throughput wraps the timed code in ``course_lib.tools.timing.timing_section()``."""
    from course_lib.tools.profiles import describe_environment, get_profile, seed_everything

    import os

    import torch

    # transformers' "Loading weights" and "Writing model shards" bars take well under a second here and
    # would be saved as frozen "0%" text in the notebooks; the course shows its own bars for long work.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (imported by peft) logs at import that its optional `kernels` package is missing; that
    # package would fetch a CPU kernel from the Hub, which the course never calls: its own CPU code runs.
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    profile = profile or get_profile()
    if profile.name == "ci":
        # CI runs two notebooks at once on two cores: one thread each avoids oversubscription,
        # which made small matmuls over ten times slower there.
        torch.set_num_threads(1)
    seed_everything(seed, deterministic=deterministic)
    if not quiet:
        info = describe_environment(profile)
        # timings printed later depend on it, and a busy machine with too many threads distorts them
        print(f"profile: {profile.name} on {profile.device} ({profile.reason}); {torch.get_num_threads()} CPU "
              f"thread(s) for torch")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("profile", "device")))
    return profile
