"""course_lib: the helper library of the course "From attention math to LoRA on a GPU".

Each module holds one idea and points to the notebook that explains it (lessons 00-11):

=================  ===========================================================================
profiles           ci / cpu / gpu sizes, device, seeding (00_setup)
assets             pinned pretrained models and corpora, fetched and verified (00_setup)
data               datasets built from those assets: Shakespeare (04), sentiment (06-09)
checks             exercise checks that name the mistake, three-level hints (00_setup, every lesson)
editions           the student edition of the notebooks and its AGENTS.md (00_setup)
results            recorded runs of bigger profiles, with provenance (03-09)
experiments        the recorded multi-seed runs behind the lessons' tables (03-09)
attention          scaled dot-product and multi-head attention (01_attention)
losses             softmax, cross-entropy and its gradient (02_cross_entropy)
gradcheck          finite-difference gradient checking (02_cross_entropy)
model              a tiny GPT, with a KV cache (03_transformer_block; trained in 04)
positions          sinusoidal and rotary positions, their recorded comparison (03_transformer_block)
bpe                byte-level BPE from scratch (04_training_a_language_model)
train              the training loop (04_training_a_language_model; reused in 05, 10)
char_lm            the Shakespeare model's recipe, held-out loss, recipe search (04_training_a_language_model)
synthetic          a language with a known entropy rate (05_scaling_laws)
scaling            power-law and Chinchilla fits, the IsoFLOP sweep (05_scaling_laws)
finetune           encoder classifiers, metrics, the fine-tuning loop (06_finetuning; reused in 07-09)
lora               LoRA from scratch (07_lora; used in 08, 09)
peft_family        BitFit, adapters, prompt and prefix tuning, AdaLoRA, memory split (08_peft_family)
quant              NF4 and int4/int8 block-wise quantisation, QLoRA layers (08_peft_family)
causal_lm          LoRA on a causal chat model: JSON task, exact metric, training (09_lora_causal_lm_gpu)
ddp                data parallelism on several processes (10_scaling_out)
bench              throughput, MFU and LoRA-vs-peft benchmarks (10_scaling_out)
parallel           several processes through torchrun, with timeouts (11_model_parallelism)
tensor_parallel    one block split Megatron-style: columns, rows, heads (11_model_parallelism)
pipeline           the GPT in GPipe stages with micro-batches (11_model_parallelism)
sharded            ZeRO stage 1 and FSDP2 against DDP, bytes per rank (11_model_parallelism)
activation_memory  activations per layer (Korthikanti et al.), recomputation (11_model_parallelism)
plots, widgets     figures and ipywidgets explorers used by several lessons (first in 01_attention)
=================  ===========================================================================
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
