"""The parameter-efficient fine-tuning family on one classifier: BitFit, adapters, prompt and prefix
tuning, LoRA, AdaLoRA and QLoRA, with the memory each one needs.

Explained in notebooks/08_peft_family.ipynb. Every method starts from the classifier of
notebooks/06_finetuning.ipynb (:class:`course_lib.parts.classifier.SentenceClassifier`: MiniLM, mean pooling,
dropout, a linear head) and changes which numbers train:

* BitFit (Ben Zaken et al. 2022): only the bias vectors (``course_lib.parts.lora.apply_bitfit``).
* :class:`Adapter` / :func:`apply_adapters` (Houlsby et al. 2019): a bottleneck h + W_up f(W_down h) after
  the attention output projection and after the feed-forward output projection of every layer.
* :class:`PromptTuning` (Lester et al. 2021): n trainable vectors P (n, d) in front of the word embeddings;
  the sequence grows by n, and so does the pooling mask.
* :class:`PrefixTuning` (Li & Liang 2021): trainable keys and values (n per layer) that every query of
  every layer attends to, handed to the model as if they were a cache of n earlier tokens.
* LoRA (``course_lib.parts.lora``), AdaLoRA through ``peft`` (:func:`apply_adalora`, :func:`adalora_ranks`),
  QLoRA (``course_lib.parts.quant``).
* :func:`train_method` (the course's loop for all of them, with the per-step hook AdaLoRA needs) and
  :func:`memory_split` (weights / gradients / optimiser state / activations, the last measured from what
  autograd saves). The recorded multi-seed comparison is ``course_lib.experiments.peft_family``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.parts import classifier as classifier_parts, lora
from course_lib.parts.loop import linear_schedule, LoopConfig, train

__all__ = [
    "load_classifier_parts", "classifier", "Adapter", "AdapterAfter", "apply_adapters", "adapter_count",
    "PromptTuning", "PrefixTuning", "ClassifierWithLoss", "apply_adalora", "adalora_ranks", "ADALORA_TARGETS",
    "build", "METHODS", "encode_batch", "train_method",
    "subspace_similarity", "energy_in_top", "draw_block_map", "saved_tensor_bytes", "memory_split",
]


# ----------------------------------------------------------------------------------------------
# The shared classifier
# ----------------------------------------------------------------------------------------------


def load_classifier_parts(profile: Any = None):
    """``(tokenizer, encoder)``: MiniLM without its pooler. Mean pooling never reads the pooler (a dense
    layer on the [CLS] state), so it is dropped: every parameter counted below can learn."""
    tokenizer, encoder = classifier_parts.load_encoder(profile)
    encoder.pooler = None
    return tokenizer, encoder


def classifier(encoder: nn.Module, seed: int = 0) -> classifier_parts.SentenceClassifier:
    """A fresh copy of 06's classifier around a copy of ``encoder``; ``seed`` fixes the head's initial weights."""
    torch.manual_seed(seed)
    return classifier_parts.SentenceClassifier(copy.deepcopy(encoder))


def _hidden_size(model: nn.Module) -> int:
    return model.encoder.config.hidden_size


# ----------------------------------------------------------------------------------------------
# Bottleneck adapters (Houlsby et al. 2019)
# ----------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """h + W_up f(W_down h + b_down) + b_up with W_down (m, d), W_up (d, m), f = GELU.

    Houlsby et al. (Sec. 2.1, 3.6) start near the identity: weights from a zero-mean normal with standard
    deviation 1e-2 (truncated at two), biases zero, so the adapter first passes h through almost unchanged.
    It adds 2dm + d + m parameters.
    """

    def __init__(self, d: int, m: int, init_std: float = 1e-2) -> None:
        super().__init__()
        if not (isinstance(m, int) and 1 <= m <= d):
            raise ValueError(f"the bottleneck size m must be an integer in 1..{d} (the model width), got {m!r}.")
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class AdapterAfter(nn.Module):
    """A frozen projection followed by an adapter: adapter(proj(x)). Placed before the residual add and
    LayerNorm of its sub-layer, as in Houlsby et al.'s Figure 2."""

    def __init__(self, proj: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.proj, self.adapter = proj, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.proj(x))


def apply_adapters(model: nn.Module, m: int = 8, *, train_layer_norm: bool = True,
                   trainable_extra: Sequence[str] = ("head",)) -> nn.Module:
    """Freeze ``model`` and put an :class:`Adapter` after every ``output.dense`` (BERT's attention output
    projection and feed-forward output projection: two per layer). Houlsby et al. also train the
    LayerNorm parameters (``train_layer_norm``); ``trainable_extra`` names the new head. In place."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n, mod in model.named_modules() if n.endswith("output.dense") and isinstance(mod, nn.Linear)]
    if not targets:
        raise ValueError("no module ends with 'output.dense': apply_adapters expects a BERT-style encoder.")
    d = _hidden_size(model)
    for name in targets:
        lora._set_child(model, name, AdapterAfter(model.get_submodule(name), Adapter(d, m)))
    if train_layer_norm:
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.requires_grad_(True)
    lora._train_extra(model, list(trainable_extra))
    return model


def adapter_count(n_layers: int, d: int, m: int, *, layer_norms_per_layer: int = 2,
                  embedding_layer_norm: bool = True) -> int:
    """Trainable numbers of :func:`apply_adapters` without the head: per layer two adapters of
    2dm + d + m plus the LayerNorms (gain and bias, 2d each); BERT has one more LayerNorm on the embeddings."""
    per_layer = 2 * (2 * d * m + d + m) + layer_norms_per_layer * 2 * d
    return n_layers * per_layer + (2 * d if embedding_layer_norm else 0)


# ----------------------------------------------------------------------------------------------
# Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021)
# ----------------------------------------------------------------------------------------------


def _sample_vocabulary(encoder: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """n token ids drawn from the ordinary word pieces (BERT's ids below 1000 are [PAD], [unused*] and specials)."""
    vocab = encoder.config.vocab_size
    return torch.randint(min(1000, vocab - 1), vocab, (n,), generator=generator)


class PromptTuning(nn.Module):
    """06's classifier with n trainable soft tokens P (n, d) in front of every input's word embeddings.

    The encoder and its embeddings are frozen; P and the head train. The encoder then sees n + T positions
    (P gets positions 0..n-1, as in ``peft``), so the attention mask and the pooling mask grow by n ones:
    the sentence embedding averages the states of the soft tokens and the real tokens. P starts as the
    embeddings of n random vocabulary tokens (Lester et al. 2021, Sec. 3, "sampled vocab").
    """

    def __init__(self, base: classifier_parts.SentenceClassifier, n_virtual: int = 10, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, classifier_parts.SentenceClassifier):
            raise TypeError("PromptTuning wraps a course_lib.parts.classifier.SentenceClassifier.")
        if not (isinstance(n_virtual, int) and n_virtual >= 1):
            raise ValueError(f"n_virtual (the number of soft tokens) must be a positive integer, got {n_virtual!r}.")
        self.base, self.n_virtual, self.n_classes = base, n_virtual, base.n_classes
        base.encoder.requires_grad_(False)
        words = base.encoder.get_input_embeddings()
        ids = _sample_vocabulary(base.encoder, n_virtual, torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(words.weight[ids].detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **ignored: Any) -> torch.Tensor:
        B = input_ids.shape[0]
        embeds = self.base.encoder.get_input_embeddings()(input_ids)
        embeds = torch.cat([self.prompt.expand(B, -1, -1), embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(B, self.n_virtual), attention_mask], dim=1)
        hidden = self.base.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.base.head(self.base.dropout(self.base._pool(hidden, mask)))


class PrefixTuning(nn.Module):
    """06's classifier with n trainable key and value vectors in every layer (Li & Liang 2021).

    ``prefix`` has shape (L, 2, n, d): for layer l, keys P_k = prefix[l, 0] and values P_v = prefix[l, 1],
    split into heads like the model's own. Attention then reads softmax(q [P_k; K]^T / sqrt(d_h)) [P_v; V]:
    we give the model P_k, P_v as a cache of n "earlier tokens" (``transformers``' DynamicCache), and the
    attention mask grows by n ones. The output still has T positions, so the pooling is unchanged; the text
    gets positions n..n+T-1 (as in ``peft``). The prefix starts as the keys and values the frozen model
    computes for n random vocabulary tokens (Li & Liang 2021, Sec. 7.2: initialising with real words'
    activations is more stable than random). 2 L n d trainable numbers, plus the head.
    """

    def __init__(self, base: classifier_parts.SentenceClassifier, n_virtual: int = 10, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, classifier_parts.SentenceClassifier):
            raise TypeError("PrefixTuning wraps a course_lib.parts.classifier.SentenceClassifier.")
        if isinstance(n_virtual, bool) or not (isinstance(n_virtual, int) and n_virtual >= 1):
            raise ValueError(f"n_virtual (the prefix length) must be a positive integer, got {n_virtual!r}.")
        self.base, self.n_virtual, self.n_classes = base, n_virtual, base.n_classes
        base.encoder.requires_grad_(False)
        config = base.encoder.config
        self.n_layers, self.n_heads = config.num_hidden_layers, config.num_attention_heads
        ids = _sample_vocabulary(base.encoder, n_virtual, torch.Generator().manual_seed(seed))
        self.prefix = nn.Parameter(self._word_keys_values(ids))

    @torch.no_grad()
    def _word_keys_values(self, ids: torch.Tensor) -> torch.Tensor:
        """(L, 2, n, d): the outputs of every layer's key and value projections on the tokens ``ids``."""
        layers = self.base.encoder.encoder.layer
        found: dict[tuple[int, int], torch.Tensor] = {}
        hooks = [getattr(layer.attention.self, name).register_forward_hook(
                     lambda mod, args, out, key=(i, j): found.__setitem__(key, out[0]))
                 for i, layer in enumerate(layers) for j, name in enumerate(("key", "value"))]
        was_training = self.base.encoder.training
        self.base.encoder.eval()
        try:
            self.base.encoder(input_ids=ids.unsqueeze(0), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        finally:
            for h in hooks:
                h.remove()
            self.base.encoder.train(was_training)
        return torch.stack([torch.stack([found[(i, 0)], found[(i, 1)]]) for i in range(len(layers))])

    def cache(self, batch_size: int):
        """The prefix as a DynamicCache: per layer keys and values of shape (B, heads, n, d_head)."""
        from transformers import DynamicCache

        L, _, n, d = self.prefix.shape
        per_head = self.prefix.view(L, 2, n, self.n_heads, d // self.n_heads).transpose(2, 3)  # (L, 2, H, n, d_h)
        cache = DynamicCache()
        for layer in range(L):
            k, v = (per_head[layer, j].unsqueeze(0).expand(batch_size, -1, -1, -1) for j in (0, 1))
            cache.update(k, v, layer)
        return cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **ignored: Any) -> torch.Tensor:
        B = input_ids.shape[0]
        mask = torch.cat([attention_mask.new_ones(B, self.n_virtual), attention_mask], dim=1)
        hidden = self.base.encoder(input_ids=input_ids, attention_mask=mask,
                                   past_key_values=self.cache(B)).last_hidden_state
        return self.base.head(self.base.dropout(self.base._pool(hidden, attention_mask)))

    def peft_layout(self) -> torch.Tensor:
        """The prefix as ``peft``'s PrefixEncoder stores it: one row per virtual token of L * 2 * d numbers
        (layer 0 keys, layer 0 values, layer 1 keys, ...)."""
        L, _, n, d = self.prefix.shape
        return self.prefix.detach().permute(2, 0, 1, 3).reshape(n, L * 2 * d)


# ----------------------------------------------------------------------------------------------
# AdaLoRA through peft
# ----------------------------------------------------------------------------------------------


class ClassifierWithLoss(nn.Module):
    """06's classifier behind the interface ``peft`` expects: called with ``labels`` it returns an output
    with ``.loss`` and ``.logits``; without, the logits. AdaLoRA adds its orthogonality penalty to
    ``outputs.loss`` and silently skips it when the model returns no ``.loss``."""

    returns_loss = True

    def __init__(self, base: classifier_parts.SentenceClassifier) -> None:
        super().__init__()
        self.classifier, self.n_classes = base, base.n_classes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **ignored: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask)
        if labels is None:
            return logits
        return SequenceClassifierOutput(loss=F.cross_entropy(logits, labels), logits=logits)


# the six weight matrices of every BERT layer, as AdaLoRA adapts them (Zhang et al. 2023, Sec. 4)
ADALORA_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)")
MATRIX_NAMES = {"attention.self.query": "W_q", "attention.self.key": "W_k", "attention.self.value": "W_v",
                "attention.output.dense": "W_o", "intermediate.dense": "W_f1", "output.dense": "W_f2"}


def apply_adalora(base: classifier_parts.SentenceClassifier, *, total_step: int, init_r: int = 8, target_r: int = 4,
                  orth_reg_weight: float = 0.5, **config: Any):
    """AdaLoRA (Zhang et al. 2023) on all six matrices of every layer, through ``peft``'s AdaLoraConfig.

    Each update is P Λ Q (``lora_B``, ``lora_E``, ``lora_A`` in peft), init_r (d_in + d_out + 1) numbers per
    matrix; the budget of kept singular values falls from init_r to target_r per matrix on average between
    ``tinit`` and ``total_step - tfinal``. Call ``model.update_and_allocate(step)`` after every optimiser
    step (``train_method(on_step=...)`` does, see :func:`build`).

    Returns peft's AdaLoRA *tuner* (``get_peft_model(...).base_model``), not the ``PeftModel`` around it:
    without a task type, ``PeftModel.forward`` calls the wrapped classifier directly and the tuner's
    forward, which adds the orthogonality penalty to ``.loss``, never runs.
    """
    import peft

    defaults = dict(tinit=max(0, total_step // 10), tfinal=max(0, total_step // 5),
                    deltaT=max(1, total_step // 20))
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=total_step, target_modules=ADALORA_TARGETS,
                             orth_reg_weight=orth_reg_weight, lora_alpha=init_r, modules_to_save=["head"],
                             **{**defaults, **config})
    return peft.get_peft_model(ClassifierWithLoss(base), cfg).base_model


def adalora_ranks(model: nn.Module) -> dict[tuple[int, str], int]:
    """{(layer, matrix): rank kept}: the number of non-zero entries of each ``lora_E`` (Λ's diagonal);
    AdaLoRA zeroes the singular values it prunes."""
    import re

    ranks = {}
    for name, p in model.named_parameters():
        if ".lora_E." not in name:
            continue
        found = re.search(r"layer\.(\d+)\.(.+)\.lora_E", name)
        if found:
            ranks[(int(found.group(1)), MATRIX_NAMES.get(found.group(2), found.group(2)))] = int(
                torch.count_nonzero(p.detach()))
    return ranks


# ----------------------------------------------------------------------------------------------
# One builder and one training loop for every method
# ----------------------------------------------------------------------------------------------

LORA_TARGETS, LORA_R, LORA_ALPHA = ("query", "value"), 8, 16
ADAPTER_M, N_VIRTUAL = 8, 10

# name -> learning rates tried on validation, a factor of ~3 apart (the recorded run picks one per method)
METHODS: dict[str, tuple[float, ...]] = {
    "full fine-tuning": (5e-5, 1.5e-4, 4.5e-4),
    "linear probe": (3e-3, 1e-2, 3e-2),
    "BitFit": (1e-3, 3e-3, 1e-2),
    "adapters": (1e-3, 3e-3, 1e-2),
    "prompt tuning": (1e-2, 3e-2, 1e-1),
    "prefix tuning": (3e-3, 1e-2, 3e-2),
    "LoRA": (1e-3, 3e-3, 1e-2),
    "AdaLoRA": (1e-3, 3e-3, 1e-2),
    "QLoRA": (1e-3, 3e-3, 1e-2),
}


def build(method: str, encoder: nn.Module, *, seed: int = 0, total_steps: int = 100
          ) -> tuple[nn.Module, Callable[[int], None] | None]:
    """``(model, on_step)`` for ``method`` (a key of :data:`METHODS`) on a fresh copy of ``encoder``.

    ``on_step(step)`` must run after every optimiser step (only AdaLoRA has one). ``seed`` fixes every
    random initialisation (head, A, adapters, soft tokens)."""
    from course_lib.parts import quant

    base = classifier(encoder, seed)
    if method == "full fine-tuning":
        return base, None
    if method == "linear probe":
        return base.freeze_encoder(), None
    if method == "BitFit":
        return lora.apply_bitfit(base, trainable_extra=["head"]), None
    if method == "adapters":
        return apply_adapters(base, ADAPTER_M), None
    if method == "prompt tuning":
        return PromptTuning(base, N_VIRTUAL, seed=seed), None
    if method == "prefix tuning":
        return PrefixTuning(base, N_VIRTUAL, seed=seed), None
    if method == "LoRA":
        return lora.apply_lora(base, list(LORA_TARGETS), r=LORA_R, alpha=LORA_ALPHA, trainable_extra=["head"]), None
    if method == "AdaLoRA":
        model = apply_adalora(base, total_step=total_steps)
        return model, model.update_and_allocate
    if method == "QLoRA":
        return quant.apply_qlora(base, LORA_TARGETS, r=LORA_R, alpha=LORA_ALPHA, trainable_extra=("head",)), None
    raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")


def encode_batch(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts`` (padded to the longest), on ``device``."""
    batch = classifier_parts.tokenize(tokenizer, texts, max_length)
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def _loss(model: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    batch, labels = batch
    if getattr(model, "returns_loss", False):
        return model(**batch, labels=labels).loss  # includes AdaLoRA's orthogonality penalty
    return F.cross_entropy(model(**batch), labels)


def train_method(model: nn.Module, tokenizer: Any, data: Any, *, lr: float, steps: int, batch_size: int = 16,
                 max_length: int = 64, seed: int = 0, weight_decay: float = 0.0, warmup_fraction: float = 0.1,
                 clip_norm: float = 1.0, on_step: Callable[[int], None] | None = None,
                 progress: bool = False, desc: str = "training") -> dict[str, Any]:
    """Train the trainable parameters of ``model`` for ``steps`` AdamW steps on ``data`` (text, label), with
    the course's loop (``course_lib.parts.loop``).

    Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0; gradient clipping at
    ``clip_norm``; batches drawn from permutations seeded by ``seed`` (a new one whenever the last is
    used up). ``on_step(step)`` runs after each optimiser step, before the gradients are cleared
    (AdaLoRA's ``update_and_allocate`` reads them). Returns the step times (ms, forward + backward +
    update, tokenising excluded), the losses and the optimiser state in bytes.
    """
    texts, labels = classifier_parts.texts_and_labels(data)
    if not (steps >= 1 and lr > 0 and batch_size >= 1):
        raise ValueError(f"need steps >= 1, lr > 0 and batch_size >= 1, got {steps}, {lr}, {batch_size}.")
    device = classifier_parts._device_of(model)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        order: list[int] = []
        while True:
            if len(order) < batch_size:
                order += torch.randperm(len(texts), generator=generator).tolist()
            index, order = order[:batch_size], order[batch_size:]
            yield encode_batch(tokenizer, [texts[i] for i in index], max_length, device), labels[index].to(device)

    config = LoopConfig(steps=steps, lr=lr, schedule=linear_schedule(lr, max(1, round(warmup_fraction * steps)), steps),
                        weight_decay=weight_decay, betas=(0.9, 0.999), grad_clip=clip_norm or None, log_every=steps,
                        time_steps=True, progress=progress, desc=desc, leave=False)
    history = train(model, batches(), _loss, config, on_step=on_step)
    return dict(step_ms=float(np.median([1000 * s for s in history.step_seconds])), losses=history.losses,
                final_loss=float(np.mean(history.losses[-10:])), optimizer_bytes=history.optimizer_bytes,
                trainable=lora.count_trainable(model))


# ----------------------------------------------------------------------------------------------
# Memory: weights, gradients, optimiser state, activations
# ----------------------------------------------------------------------------------------------


def saved_tensor_bytes(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor | None = None) -> int:
    """Bytes autograd keeps for the backward pass of one training forward pass of ``model`` on ``batch``.

    Every tensor saved for backward passes through ``torch.autograd.graph.saved_tensors_hooks``; distinct
    storages are counted once, and the model's own parameters and buffers (counted as weights) are left
    out. This is what the activations cost; torch has no peak-memory counter on the CPU to read instead.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        labels = labels if labels is not None else torch.zeros(len(batch["input_ids"]), dtype=torch.long)
        loss = _loss(model, (batch, labels))
    del loss
    model.train(was_training)
    return sum(storages.values())


def memory_split(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes of training memory in four parts.

    weights: every parameter and buffer (a 4-bit base counts its packed codes and constants); gradients:
    one number per trainable parameter; optimiser: AdamW's two moments per trainable parameter (its step
    counters are a few bytes more; ``lora.optimizer_state_bytes`` measures them after a step);
    activations: :func:`saved_tensor_bytes` on ``batch``.
    """
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return dict(weights=sum(seen.values()),
                gradients=sum(p.numel() * p.element_size() for p in trainable),
                optimizer=sum(2 * p.numel() * p.element_size() for p in trainable),
                activations=saved_tensor_bytes(model, batch, labels))


# ----------------------------------------------------------------------------------------------
# The recorded experiment: every method, learning rate chosen on validation, several seeds
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# What the LoRA paper saw (Hu et al. 2021, Sec. 7), and a picture of where each method adds numbers
# ----------------------------------------------------------------------------------------------


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j) (Hu et al. 2021, Eq. 4): how much of the subspace
    spanned by the top-i right-singular vectors of A1 lies in that of the top-j of A2. 1 when one contains
    the other, 0 when they are orthogonal; two random subspaces of R^d give about max(i, j) / d."""
    V1 = torch.linalg.svd(A1.detach().double(), full_matrices=False).Vh[:i]
    V2 = torch.linalg.svd(A2.detach().double(), full_matrices=False).Vh[:j]
    return float((V1 @ V2.T).pow(2).sum() / min(i, j))


def energy_in_top(delta: torch.Tensor, k: int) -> float:
    """Fraction of ||delta||_F^2 in its k largest singular values: near 1 means delta is nearly rank k."""
    s = torch.linalg.svdvals(delta.detach().double())
    return float(s[:k].pow(2).sum() / s.pow(2).sum())


def draw_block_map(ax=None):
    """One transformer (BERT) layer, bottom to top, with the pieces each method adds or trains."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 6.5))
    grey, ink = "#dddddd", "#333333"

    def box(x, y, w, h, text, color=grey, size=9):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec=ink, lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color=ink, lw=1))

    colors = {"prompt": "#9ecae1", "prefix": "#c6dbef", "LoRA": "#fdae6b", "AdaLoRA": "#fdd0a2",
              "adapter": "#a1d99b", "BitFit": "#bcbddc", "QLoRA": "#fc9272"}
    # the frozen layer
    box(3.0, 0.0, 4.2, 0.6, "word embeddings + positions (+ LayerNorm)")
    box(0.2, 0.0, 2.4, 0.6, "soft tokens P (n, d)\nprompt tuning", colors["prompt"], 8)
    arrow(2.6, 0.3, 3.0, 0.3)
    for k, name in enumerate(("W_q", "W_k", "W_v")):
        box(3.0 + 1.45 * k, 1.2, 1.2, 0.6, name)
        arrow(5.1, 0.6, 3.6 + 1.45 * k, 1.2)
    box(3.0, 2.2, 4.1, 0.6, "softmax(q [P_k; K]ᵀ/√d_h) [P_v; V]")
    box(7.6, 1.5, 2.6, 0.9, "prefix P_k, P_v (n per layer)\nprefix tuning", colors["prefix"], 8)
    arrow(7.6, 1.95, 7.1, 2.4)
    box(3.0, 3.2, 2.0, 0.6, "W_o")
    box(5.3, 3.2, 1.8, 0.6, "adapter", colors["adapter"])
    arrow(5.0, 3.5, 5.3, 3.5)
    box(3.0, 4.1, 4.1, 0.5, "add residual, LayerNorm")
    box(3.0, 4.9, 2.0, 0.6, "W_f1, GELU")
    box(3.0, 5.8, 2.0, 0.6, "W_f2")
    box(5.3, 5.8, 1.8, 0.6, "adapter", colors["adapter"])
    arrow(5.0, 6.1, 5.3, 6.1)
    box(3.0, 6.7, 4.1, 0.5, "add residual, LayerNorm")
    for x, y0, y1 in ((5.1, 1.8, 2.2), (4.0, 2.8, 3.2), (6.2, 3.8, 4.1), (4.0, 4.6, 4.9), (4.0, 5.5, 5.8),
                      (6.2, 6.4, 6.7)):
        arrow(x, y0, x, y1)  # W_o and W_f2 pass through their adapters before the residual add
    # LoRA / AdaLoRA / QLoRA beside the matrices
    box(0.2, 1.2, 2.4, 0.6, "LoRA BA on W_q, W_v", colors["LoRA"], 8)
    arrow(2.6, 1.5, 3.0, 1.5)
    box(0.2, 3.2, 2.4, 1.3, "AdaLoRA PΛQ on all six\nW_q W_k W_v W_o W_f1 W_f2\n(ranks re-allocated)",
        colors["AdaLoRA"], 8)
    arrow(2.6, 3.85, 3.0, 3.5)
    arrow(2.6, 3.85, 3.0, 5.2)
    box(0.2, 5.3, 2.4, 1.1, "QLoRA: every W in NF4\n(frozen, 4 bits) + LoRA", colors["QLoRA"], 8)
    arrow(2.6, 5.85, 3.0, 6.1)
    box(7.6, 4.1, 2.6, 1.4, "BitFit: every bias b\n(of each W and LayerNorm)\ntrains, nothing else",
        colors["BitFit"], 8)
    arrow(7.6, 4.8, 7.1, 4.35)
    ax.text(5.1, 7.5, "× L layers, then mean pooling and the head (trained by every method)", ha="center", fontsize=9)
    ax.set_xlim(0, 10.4)
    ax.set_ylim(-0.2, 7.8)
    ax.set_xlabel("(a schematic: no axis units)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Where each method adds or trains numbers in one encoder layer (grey: frozen)")
    return ax
