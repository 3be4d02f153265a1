"""Fine-tuning a pretrained encoder for sentence classification.

Explained in notebooks/06_finetuning.ipynb; reused by notebooks/07_lora.ipynb.

The pieces, with the symbols of the notebook:

* ``mean_pool(H, m)``: the sentence embedding e = Σ_t m_t H_t / Σ_t m_t, an average over the real
  tokens only (m is the attention mask, 1 for a token and 0 for padding).
* :class:`SentenceClassifier`: encoder → pooling → dropout → a linear head, logits z = W e + b.
* :func:`embed`: frozen-encoder embeddings for a linear probe.
* :func:`train_classifier`: AdamW, linear warm-up then linear decay, gradient clipping, and early
  stopping on the validation accuracy (the best weights are restored at the end).
* :func:`classification_metrics` and :func:`evaluate`: accuracy, precision, recall, F1 of the positive
  class, macro-F1 and the confusion matrix (rows: true class, columns: predicted class).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

POOLINGS = ("mean", "cls")


# ----------------------------------------------------------------------------------------------
# Loading the encoder and pooling its token states into one vector per sentence
# ----------------------------------------------------------------------------------------------


def load_encoder(profile: Any = None, name: str = "minilm-l6-v2"):
    """``(tokenizer, encoder)`` of a pretrained encoder, the encoder on ``profile.device`` in eval mode.

    ``name`` is a course asset (fetched and verified through :mod:`course_lib.tools.assets`), a local folder,
    or a Hugging Face Hub id, which ``from_pretrained`` then downloads itself.
    """
    from transformers import AutoModel, AutoTokenizer

    from course_lib.tools.assets import model_path

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be an asset name, a folder or a Hub id (a non-empty str), got {name!r}.")
    path = model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    if profile is not None:
        encoder.to(profile.device)
    return tokenizer, encoder.eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """e = Σ_t m_t H_t / Σ_t m_t: average the token states ``hidden`` (B, T, H) over the tokens whose
    ``attention_mask`` (B, T) is 1, so padding never enters the sentence embedding (B, H)."""
    if hidden.dim() != 3 or attention_mask.dim() != 2 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"mean_pool needs hidden states (B, T, H) and an attention mask (B, T) with the same "
                         f"B and T, got {tuple(hidden.shape)} and {tuple(attention_mask.shape)}.")
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The state of the first token ([CLS]) as the sentence embedding (B, H)."""
    if hidden.dim() != 3:
        raise ValueError(f"cls_pool needs hidden states (B, T, H), got shape {tuple(hidden.shape)}.")
    return hidden[:, 0]


def _pool(name: str):
    if name not in POOLINGS:
        raise ValueError(f"Unknown pooling {name!r}: choose one of {', '.join(POOLINGS)}.")
    return mean_pool if name == "mean" else cls_pool


class SentenceClassifier(nn.Module):
    """encoder → pooling → dropout → linear head: logits z = W·pool(H) + b, shape (B, n_classes).

    ``encoder`` is any ``transformers`` encoder whose output has ``last_hidden_state`` (BERT, MiniLM,
    RoBERTa ...), with or without LoRA layers injected into it.
    """

    def __init__(self, encoder: nn.Module, n_classes: int = 2, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise TypeError("encoder must be a transformers model with config.hidden_size "
                            "(load one with course_lib.parts.finetune.load_encoder).")
        self.encoder = encoder
        self.pooling = pooling
        self._pool = _pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, n_classes)
        self.n_classes = n_classes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(self.dropout(self._pool(hidden, attention_mask)))

    def freeze_encoder(self, frozen: bool = True) -> SentenceClassifier:
        """Freeze (or unfreeze) every encoder parameter; the head stays trainable."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        return self


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ----------------------------------------------------------------------------------------------
# Data: texts and labels in, padded batches out
# ----------------------------------------------------------------------------------------------


def texts_and_labels(data: Any) -> tuple[list[str], torch.Tensor]:
    """The ``text`` and ``label`` columns of a ``datasets.Dataset`` or a mapping of lists."""
    try:
        texts, labels = data["text"], data["label"]
    except (KeyError, TypeError, IndexError):
        raise TypeError("the data must have a 'text' and a 'label' column (a datasets.Dataset, or a dict "
                        "{'text': [...], 'label': [...]})") from None
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("every entry of the 'text' column must be a str.")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if len(texts) != len(labels):
        raise ValueError(f"'text' has {len(texts)} rows but 'label' has {len(labels)}.")
    if len(texts) == 0:
        raise ValueError("the data set is empty.")
    return texts, labels


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise TypeError("texts must be a list of str (wrap a single sentence in a list: [text]).")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str.")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text of the batch, truncate at ``max_length`` tokens."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def _length_sorted_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int
                           ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Batches of texts of similar length (less padding, same results), with their original indices."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield index, tokenize(tokenizer, [texts[i] for i in index], max_length)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Frozen embeddings (for the linear probe) and predictions
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], *, pooling: str = "mean",
          batch_size: int = 64, max_length: int = 128, progress: bool = False) -> torch.Tensor:
    """Sentence embeddings (N, H), float32 on the CPU, of a frozen encoder, in the order of ``texts``."""
    texts = _check_texts(texts)
    pool = _pool(pooling)
    device = _device_of(encoder)
    was_training = encoder.training
    encoder.eval()
    out = torch.empty(len(texts), encoder.config.hidden_size)
    batches = _length_sorted_batches(tokenizer, texts, batch_size, max_length)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=math.ceil(len(texts) / batch_size), desc="embedding")
    for index, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = encoder(**batch).last_hidden_state
        out[index] = pool(hidden, batch["attention_mask"]).float().cpu()
    encoder.train(was_training)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64,
                   max_length: int = 128) -> torch.Tensor:
    """The logits (N, n_classes), float32 on the CPU, of a :class:`SentenceClassifier` on ``texts``."""
    texts = _check_texts(texts)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out = torch.empty(len(texts), model.n_classes)
    for index, batch in _length_sorted_batches(tokenizer, texts, batch_size, max_length):
        out[index] = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _as_label_tensor(values: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values))
    if tensor.dim() != 1:
        raise ValueError(f"{what} must be one label per example (1-D), got shape {tuple(tensor.shape)}.")
    if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
        raise TypeError(f"{what} must hold integer class labels, not probabilities or logits "
                        f"(take argmax over the classes first).")
    return tensor.long()


def classification_metrics(y_true: Any, y_pred: Any, *, n_classes: int = 2, positive: int = 1) -> dict[str, Any]:
    """Accuracy, precision / recall / F1 of class ``positive``, macro-F1 and the confusion matrix.

    With TP, FP, FN counted for the positive class: precision P = TP / (TP + FP), recall
    R = TP / (TP + FN), F1 = 2PR / (P + R) (0 when undefined, as scikit-learn does). Macro-F1 averages
    the F1 of every class. ``confusion[i, j]`` counts examples of true class i predicted as j.
    """
    t, p = _as_label_tensor(y_true, "y_true"), _as_label_tensor(y_pred, "y_pred")
    if len(t) != len(p) or len(t) == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and equally long, got {len(t)} and {len(p)}.")
    for what, v in (("y_true", t), ("y_pred", p)):
        if v.min() < 0 or v.max() >= n_classes:
            raise ValueError(f"{what} holds labels outside 0..{n_classes - 1}; pass n_classes= if there are more classes.")
    if not 0 <= positive < n_classes:
        raise ValueError(f"positive must be a class index in 0..{n_classes - 1}, got {positive}.")
    confusion = torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)

    def prf(c: int) -> tuple[float, float, float]:
        tp = confusion[c, c].item()
        predicted, actual = confusion[:, c].sum().item(), confusion[c, :].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    precision, recall, f1 = prf(positive)
    return dict(accuracy=confusion.trace().item() / len(t), precision=precision, recall=recall, f1=f1,
                macro_f1=sum(prf(c)[2] for c in range(n_classes)) / n_classes,
                confusion=confusion.numpy(), n=len(t))


def paired_bootstrap_gap(right_a: Any, right_b: Any, *, rng: np.random.Generator | None = None,
                         resamples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same test examples, with a paired bootstrap interval.

    ``right_a`` and ``right_b`` say, per test example, whether each method got it right. The test set is
    resampled with replacement ``resamples`` times, the same examples for both methods (that pairing is
    what makes the interval narrow: both are judged on the same hard and easy examples), and the gap is
    recomputed on each resample. Returns (gap, low, high) as fractions; (low, high) holds the central
    ``level`` of the resampled gaps. Notebook 06 compares its methods this way (exercise 06.3);
    peft_family and causal_lm reuse it.
    """
    a, b = np.asarray(right_a, dtype=float), np.asarray(right_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"right_a and right_b must be equally long 1-D arrays, one entry per test example; "
                         f"got shapes {a.shape} and {b.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage between 0 and 1 (e.g. 0.95), got {level}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(axis=1) - b[index].mean(axis=1)
    low, high = np.percentile(gaps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(a.mean() - b.mean()), float(low), float(high)


def evaluate(model: nn.Module, tokenizer: Any, data: Any, *, batch_size: int = 64,
             max_length: int = 128) -> dict[str, Any]:
    """:func:`classification_metrics` of ``model`` on ``data`` plus its mean cross-entropy ``loss`` and
    the ``predictions`` (a tensor of class indices, in the order of ``data``)."""
    texts, labels = texts_and_labels(data)
    logits = predict_logits(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    metrics = classification_metrics(labels, logits.argmax(-1), n_classes=model.n_classes)
    metrics["loss"] = nn.functional.cross_entropy(logits, labels).item()
    metrics["predictions"] = logits.argmax(-1)
    return metrics


# ----------------------------------------------------------------------------------------------
# Training: AdamW, warm-up, early stopping
# ----------------------------------------------------------------------------------------------


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier: rises linearly from 0 to 1 over ``warmup_steps``, then falls
    linearly to 0 at ``total_steps`` (BERT's schedule, Devlin et al. 2019, App. A.2-A.3; a warm-up of 10% of
    the steps is the default of BERT's released fine-tuning script)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices get weight decay, biases and LayerNorm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (did you freeze everything?).")
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@dataclass
class TrainingRun:
    """What :func:`train_classifier` did: one ``history`` row per validation, the best step, timings."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    best_val_accuracy: float = float("nan")
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    train_examples_per_second: float = 0.0

    def column(self, name: str) -> list[float]:
        return [row[name] for row in self.history]


def train_classifier(model: nn.Module, tokenizer: Any, train_data: Any, val_data: Any, *,
                     epochs: float = 3, lr: float = 5e-5, batch_size: int = 32, max_length: int = 128,
                     weight_decay: float = 0.01, warmup_fraction: float = 0.1, max_steps: int | None = None,
                     eval_every: int | None = None, patience: int = 3, clip_norm: float = 1.0,
                     seed: int = 0, progress: bool = True) -> TrainingRun:
    """Fine-tune the trainable parameters of ``model`` with cross-entropy and AdamW.

    The learning rate warms up over ``warmup_fraction`` of the steps and then decays linearly to 0
    (:func:`warmup_linear_decay`). Every ``eval_every`` steps (default: once per epoch) the model is
    evaluated on ``val_data``; when the validation accuracy has not improved for ``patience``
    evaluations in a row, training stops early. Either way the weights of the best evaluation are
    restored. Training runs ``epochs`` passes over ``train_data`` or ``max_steps`` steps, whichever
    is fewer.
    """
    texts, labels = texts_and_labels(train_data)
    if labels.min() < 0 or labels.max() >= model.n_classes:
        raise ValueError(f"train labels must lie in 0..{model.n_classes - 1}.")
    if not (epochs > 0 and batch_size >= 1 and lr > 0 and 0 <= warmup_fraction < 1 and patience >= 1):
        raise ValueError("need epochs > 0, batch_size >= 1, lr > 0, 0 <= warmup_fraction < 1 and patience >= 1.")
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total = math.ceil(epochs * steps_per_epoch)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        total = min(total, max_steps)
    eval_every = eval_every or min(steps_per_epoch, total)
    device = _device_of(model)

    optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr)
    warmup = round(warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear_decay(s, warmup, total))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    best = {name: p.detach().clone() for name, p in trainable.items()}
    run = TrainingRun()
    generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="fine-tuning")

    def batches() -> Iterator[torch.Tensor]:
        while True:
            yield from torch.randperm(len(texts), generator=generator).split(batch_size)

    model.train()
    start, seen, loss_sum, loss_count, since_best = time.perf_counter(), 0, 0.0, 0, 0
    for step, index in zip(range(1, total + 1), batches()):
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, [texts[i] for i in index], max_length).items()}
        loss = nn.functional.cross_entropy(model(**batch), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(trainable.values(), clip_norm)
        optimizer.step()
        scheduler.step()
        seen, loss_sum, loss_count = seen + len(index), loss_sum + loss.item(), loss_count + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0 or step == total:
            val = evaluate(model, tokenizer, val_data, batch_size=2 * batch_size, max_length=max_length)
            model.train()
            run.history.append(dict(step=step, epoch=step / steps_per_epoch, lr=scheduler.get_last_lr()[0],
                                    train_loss=loss_sum / loss_count, val_loss=val["loss"],
                                    val_accuracy=val["accuracy"], val_f1=val["f1"]))
            loss_sum, loss_count = 0.0, 0
            if not run.best_val_accuracy >= val["accuracy"]:  # also true for the first evaluation (nan)
                run.best_val_accuracy, run.best_step, since_best = val["accuracy"], step, 0
                best = {name: p.detach().clone() for name, p in trainable.items()}
            else:
                since_best += 1
                if since_best >= patience:
                    run.stopped_early = step < total
                    break
    run.steps = step
    run.seconds = time.perf_counter() - start
    run.train_examples_per_second = seen / run.seconds
    if bar is not None:
        bar.close()
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(best[name])
    model.eval()
    return run


def as_dataset(texts: Sequence[str], labels: Sequence[int] | torch.Tensor) -> Mapping[str, list]:
    """A minimal ``{'text', 'label'}`` mapping that every function here accepts as data."""
    return {"text": list(texts), "label": [int(y) for y in labels]}


# ----------------------------------------------------------------------------------------------
# Training for a fixed number of steps (notebook 07: one budget for every method)
# ----------------------------------------------------------------------------------------------


def train_fixed_steps(model: nn.Module, tokenizer: Any, train_data: Any, *, lr: float, steps: int,
                      batch_size: int = 16, max_length: int = 64, weight_decay: float = 0.0,
                      warmup_fraction: float = 0.1, clip_norm: float = 1.0, seed: int = 0,
                      progress: bool = False) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` for exactly ``steps`` AdamW steps, no early stopping.

    Notebook 07 compares methods that differ only in *what* trains (head, biases, LoRA, everything), so
    they share this loop: the same batch order for a given ``seed``, linear warm-up over
    ``warmup_fraction`` of the steps then linear decay, gradient clipping. Returns the number of
    trainable parameters, the bytes of Adam's state (measured after training), the median step time in
    ms (the first step, which allocates the optimiser state, left out), the mean loss of the last five
    steps and the seconds of the whole run.
    """
    from course_lib.parts.lora import count_trainable, optimizer_state_bytes

    texts, labels = texts_and_labels(train_data)
    if not (isinstance(steps, int) and steps >= 1 and batch_size >= 1 and lr > 0):
        raise ValueError(f"need steps >= 1 (an int), batch_size >= 1 and lr > 0, got steps={steps!r}, "
                         f"batch_size={batch_size!r}, lr={lr!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (did you freeze everything?).")
    device = _device_of(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(warmup_fraction * steps))
    # s + 1: the first step already has a (small) non-zero learning rate
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear_decay(s + 1, warmup, steps + 1))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="training")
    model.train()
    step_times, losses, start = [], [], time.perf_counter()
    for step in range(steps):
        index = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, [texts[i] for i in index], max_length).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        loss = nn.functional.cross_entropy(model(**batch), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - tick)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    timed = sorted(step_times[1:] or step_times)
    return dict(trainable=count_trainable(model), adam_bytes=optimizer_state_bytes(optimizer),
                step_ms=1000 * timed[len(timed) // 2], final_loss=float(np.mean(losses[-5:])),
                seconds=time.perf_counter() - start)


def train_head_on_embeddings(model: nn.Module, e_train: torch.Tensor, y_train: Any, *, lr: float, steps: int,
                             batch_size: int = 16, weight_decay: float = 0.0, warmup_fraction: float = 0.1,
                             clip_norm: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The linear probe of notebook 07 on pre-computed sentence embeddings ``e_train`` (N, H).

    With the encoder frozen its output never changes, so it is computed once (:func:`embed`, eval
    mode) instead of at every step; the head (dropout, then ``model.head``) trains with the loop,
    schedule and batch order of :func:`train_fixed_steps`. Returns the same fields.
    """
    from course_lib.parts.lora import optimizer_state_bytes

    labels = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    params = list(model.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear_decay(s + 1, warmup, steps + 1))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    step_times, losses, start = [], [], time.perf_counter()
    for step in range(steps):
        index = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        tick = time.perf_counter()
        loss = nn.functional.cross_entropy(model.head(model.dropout(e_train[index])), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - tick)
        losses.append(loss.item())
    model.eval()
    timed = sorted(step_times[1:] or step_times)
    return dict(trainable=sum(p.numel() for p in params), adam_bytes=optimizer_state_bytes(optimizer),
                step_ms=1000 * timed[len(timed) // 2], final_loss=float(np.mean(losses[-5:])),
                seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Several seeds: a paired bootstrap over test examples *and* seeds
# ----------------------------------------------------------------------------------------------


def paired_bootstrap_gap_seeds(right_a: Any, right_b: Any, *, rng: np.random.Generator | None = None,
                               resamples: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Like :func:`paired_bootstrap_gap`, for methods run with several seeds on the same test examples.

    ``right_a`` and ``right_b`` have shape (seeds, examples): row s says which test examples each method
    got right in run s (runs of the same seed share their labelled examples and batch order, so they
    are paired too). Each resample draws the seeds *and* the test examples with replacement, the same
    draw for both methods, and recomputes the gap of the mean accuracies; so the interval holds both the
    luck of the test sample and the seed-to-seed spread. With 3 seeds the seed part is crude (a
    bootstrap over 3 values underestimates their spread by a factor of about sqrt(2/3)): the per-seed
    gaps are worth printing beside it. Returns (gap, low, high) as fractions.
    """
    a, b = np.atleast_2d(np.asarray(right_a, dtype=float)), np.atleast_2d(np.asarray(right_b, dtype=float))
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"right_a and right_b must be equally shaped (seeds, examples) arrays, got shapes "
                         f"{a.shape} and {b.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage between 0 and 1 (e.g. 0.95), got {level}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    n_seeds, n = a.shape
    d = a - b
    columns = rng.integers(0, n, size=(resamples, n))
    rows = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    per_seed = np.stack([d[s][columns].mean(axis=1) for s in range(n_seeds)])  # (seeds, resamples)
    gaps = per_seed[rows, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = np.percentile(gaps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(d.mean()), float(low), float(high)


def pairwise_gaps(right: Mapping[str, Any], *, resamples: int = 2000, level: float = 0.95,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`paired_bootstrap_gap_seeds` for every ordered pair of methods in ``right`` (name -> (seeds,
    examples)), keyed ``"A − B"``; each value holds the gap, its interval and the per-seed gaps, in
    accuracy points."""
    names, out = list(right), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = np.atleast_2d(np.asarray(right[a], float)), np.atleast_2d(np.asarray(right[b], float))
            gap, low, high = paired_bootstrap_gap_seeds(ra, rb, rng=np.random.default_rng(seed),
                                                        resamples=resamples, level=level)
            per_seed = (ra.mean(axis=1) - rb.mean(axis=1)).tolist()
            out[f"{a} − {b}"] = dict(gap=100 * gap, low=100 * low, high=100 * high,
                                     per_seed=[100 * g for g in per_seed])
    return out


def gap_between(gaps: Mapping[str, Mapping[str, Any]], a: str, b: str) -> dict[str, Any]:
    """The gap A − B from a :func:`pairwise_gaps` table, whichever order it was stored in."""
    if f"{a} − {b}" in gaps:
        return dict(gaps[f"{a} − {b}"])
    if f"{b} − {a}" in gaps:
        g = gaps[f"{b} − {a}"]
        return dict(gap=-g["gap"], low=-g["high"], high=-g["low"], per_seed=[-x for x in g["per_seed"]])
    raise KeyError(f"no gap between {a!r} and {b!r} in this table.")


def describe_gap(g: Mapping[str, Any], a: str, b: str) -> str:
    """One sentence: A's lead over B in points with its interval, and whether the interval excludes 0."""
    if g["low"] > 0:
        verdict = f"{a} is ahead"
    elif g["high"] < 0:
        verdict = f"{b} is ahead"
    else:
        verdict = "the interval includes 0: no difference this run can detect"
    def pts(x: float) -> str:
        return f"{round(x, 1) + 0.0:+.1f}"  # + 0.0 turns a rounded -0.0 into 0.0

    seeds = ", ".join(pts(x) for x in g.get("per_seed", []))
    return (f"{a} − {b}: {pts(g['gap'])} points (95% interval {pts(g['low'])} … {pts(g['high'])}"
            + (f"; per seed {seeds}" if seeds else "") + f") → {verdict}")


# ----------------------------------------------------------------------------------------------
# Recorded experiments: python -m course_lib.experiments finetuning | lora
# ----------------------------------------------------------------------------------------------


def take(data: Any, n: int | None, seed: int = 0) -> Any:
    """The first ``n`` examples of a fixed shuffle of ``data`` (all of it when ``n`` is None or too big).

    Seed s of a recorded experiment trains on ``take(train, n, seed=s)``: every method of that seed sees
    the same labelled examples, and a smaller ``n`` is a subset of a larger one.
    """
    return data if n is None or n >= len(data) else data.shuffle(seed=seed).select(range(n))


# Notebook 06 at each profile; "quick" is the seconds-long smoke form of the tests.
FINETUNING_SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(n_label=32, n_val=16, n_test=24, n_ood=8, max_length=24, epochs=1, batch_size=16,
                  evals_per_epoch=1, patience=1, lrs=(1e-4, 3e-4)),
    "ci": dict(n_label=128, n_val=64, n_test=120, n_ood=60, max_length=40, epochs=1, batch_size=16,
               evals_per_epoch=2, patience=2, lrs=(1e-4,)),
    "cpu": dict(n_label=1500, n_val=500, n_test=None, n_ood=None, max_length=64, epochs=2, batch_size=16,
                evals_per_epoch=2, patience=2, lrs=(3e-5, 1e-4, 3e-4)),
    "gpu": dict(n_label=None, n_val=None, n_test=None, n_ood=None, max_length=128, epochs=3, batch_size=32,
                evals_per_epoch=2, patience=3, lrs=(2e-5, 5e-5, 1e-4)),
}

# Notebook 07 at each profile: LoRA's alpha is alpha_over_r * r, so alpha / r is the same at every rank.
LORA_SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(n_train=32, n_val=16, n_test=16, batch_size=8, max_length=24, epochs=None, steps=2,
                  ranks=(1, 2), search_rank=2, alpha_over_r=2,
                  lrs={"linear probe": (1e-2,), "BitFit": (3e-3,), "LoRA": (1e-3, 3e-3),
                       "full fine-tuning": (1e-4,)}),
    "ci": dict(n_train=200, n_val=48, n_test=48, batch_size=8, max_length=48, epochs=None, steps=3,
               ranks=(1, 4), search_rank=4, alpha_over_r=2,
               lrs={"linear probe": (1e-2,), "BitFit": (3e-3,), "LoRA": (3e-3,), "full fine-tuning": (1e-4,)}),
    "cpu": dict(n_train=1500, n_val=500, n_test=None, batch_size=16, max_length=64, epochs=1, steps=None,
                ranks=(1, 4, 8, 16), search_rank=8, alpha_over_r=2,
                lrs={"linear probe": (3e-3, 1e-2, 3e-2, 1e-1), "BitFit": (1e-3, 3e-3, 1e-2, 3e-2),
                     "LoRA": (3e-4, 1e-3, 3e-3, 1e-2), "full fine-tuning": (3e-5, 1e-4, 3e-4, 1e-3)}),
    "gpu": dict(n_train=None, n_val=None, n_test=None, batch_size=32, max_length=64, epochs=3, steps=None,
                ranks=(1, 2, 4, 8, 16, 64), search_rank=8, alpha_over_r=2,
                lrs={"linear probe": (3e-3, 1e-2, 3e-2), "BitFit": (3e-4, 1e-3, 3e-3),
                     "LoRA": (1e-4, 3e-4, 1e-3, 3e-3), "full fine-tuning": (2e-5, 5e-5, 1e-4)}),
}
LORA_TARGETS = ("query", "value")


def _sizes(table: Mapping[str, dict[str, Any]], profile: Any, quick: bool) -> dict[str, Any]:
    name = "quick" if quick else getattr(profile, "name", profile)
    if name not in table:
        raise ValueError(f"no sizes for profile {name!r}: choose one of {', '.join(table)}.")
    return dict(table[name])


def finetuning_sizes(profile: Any, quick: bool = False) -> dict[str, Any]:
    """The sizes notebook 06 and the ``finetuning`` experiment use on ``profile`` (a Profile or its name)."""
    return _sizes(FINETUNING_SIZES, profile, quick)


def lora_sizes(profile: Any, quick: bool = False) -> dict[str, Any]:
    """The sizes notebook 07 and the ``lora`` experiment use on ``profile`` (a Profile or its name)."""
    return _sizes(LORA_SIZES, profile, quick)


# Part of every cached run's key: bump it whenever a change alters what a run computes (data, model,
# training loop, evaluation), so that no number made by older code is reused.
RUN_CODE_VERSION = 2
# Sizes that only say *which* runs an experiment makes (a grid, the ranks), not what one run computes.
_NOT_IN_RUN_KEY = ("lrs", "ranks", "search_rank", "seeds")


WORKER_ENV = "COURSE_EXPERIMENT_WORKER"


def is_worker() -> bool:
    """Whether this process is an extra worker of a recorded experiment (``COURSE_EXPERIMENT_WORKER=1``).

    Run the same ``python -m course_lib.experiments NAME`` command once plainly and once or more with
    this variable set: the processes share the runs through the run cache (each claims a run before it
    starts it), the workers exit when no run is left, and only the plain process writes the record.
    """
    return os.environ.get(WORKER_ENV, "") not in ("", "0")


class _RunCache:
    """Finished runs of a long experiment, one JSON line each: an interrupted record resumes, and several
    processes can share the runs (see :func:`is_worker`).

    A run is found again only under the same key: the sizes that shape a run, the run's own settings
    and :data:`RUN_CODE_VERSION`. Each run also keeps the git commit it was computed at. A process
    claims a run with a lock file holding its pid before it starts it; a lock whose process is gone
    is taken over.
    """

    def __init__(self, name: str, profile_name: str, sizes: Mapping[str, Any], enabled: bool = True,
                 root: Any = None) -> None:
        from pathlib import Path

        from course_lib.tools.assets import cache_dir

        shaping = {k: v for k, v in sizes.items() if k not in _NOT_IN_RUN_KEY}
        self.base = dict(sizes=json_ready(shaping), code=RUN_CODE_VERSION)
        folder = Path(root) if root is not None else cache_dir() / "experiments"
        self.path = folder / f"{name}_{profile_name}.jsonl" if enabled else None
        self.locks = folder / f"{name}_{profile_name}.locks" if enabled else None
        self.done: dict[str, Any] = {}
        self._read = 0
        self.reload()

    def key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps({**self.base, **json_ready(settings)}, sort_keys=True)

    def reload(self) -> None:
        """Read the runs other processes finished since the last look."""
        if self.path is None or not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self._read)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next look
        self._read += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                entry = json.loads(line)
                self.done[entry["key"]] = entry["value"]

    def _lock(self, key: str):
        import hashlib

        return self.locks / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")

    def _claim(self, key: str) -> bool:
        if self.locks is None:
            return True
        self.locks.mkdir(parents=True, exist_ok=True)
        lock = self._lock(key)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text() or 0)
                    os.kill(pid, 0)
                    return False  # its process is alive and computing it
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    lock.unlink(missing_ok=True)  # its process died: take it over
                    continue
                except PermissionError:
                    return False
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def _compute(self, key: str, compute) -> Any:
        from course_lib.tools.profiles import code_version

        try:
            value = json_ready({**compute(), "commit": code_version()})
            self.done[key] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "value": value}) + "\n")
        finally:
            if self.locks is not None:
                self._lock(key).unlink(missing_ok=True)
        return value

    def has(self, settings: Mapping[str, Any]) -> bool:
        return self.key(settings) in self.done

    def work_on_one(self, items: Sequence[tuple[Mapping[str, Any], Any]]) -> bool:
        """Compute the first of ``items`` that is neither finished nor claimed; False if there is none."""
        self.reload()
        for settings, compute in items:
            key = self.key(settings)
            if key not in self.done and self._claim(key):
                self._compute(key, compute)
                return True
        return False

    def get_many(self, items: Sequence[tuple[Mapping[str, Any], Any]], poll_seconds: float = 15.0) -> list[Any]:
        """The values of all ``(settings, compute)`` runs: first every unclaimed one is computed here,
        then the ones other processes are computing are waited for."""
        keys = [self.key(settings) for settings, _ in items]
        while True:
            if self.work_on_one(items):   # an unclaimed run, or one whose process died
                continue
            if all(key in self.done for key in keys):
                return [self.done[key] for key in keys]
            time.sleep(poll_seconds)      # the rest are being computed by other processes

    def get(self, settings: Mapping[str, Any], compute) -> Any:
        return self.get_many([(settings, compute)])[0]


def json_ready(value: Any) -> Any:
    """``value`` with tuples as lists, numpy numbers as Python numbers (what JSON can hold)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _bits(flags: Any) -> str:
    return "".join("1" if f else "0" for f in np.asarray(flags).astype(bool))


def _unbits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def _log(name: str, message: str) -> None:
    print(f"[{name}] {time.strftime('%H:%M:%S')} {message}", flush=True)


def _vader(texts: Sequence[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts])


def vader_threshold(scores_val: np.ndarray, y_val: np.ndarray) -> float:
    """The threshold t on VADER's compound score (positive if >= t) with the best validation accuracy,
    from -0.9 to 0.9 in steps of 0.05 (the first of equally good ones)."""
    thresholds = np.round(np.arange(-0.9, 0.91, 0.05), 2)
    return float(thresholds[int(np.argmax([((scores_val >= t) == y_val).mean() for t in thresholds]))])


BOW_CS = (0.3, 1, 3, 10, 30)
PROBE_CS = (0.1, 0.3, 1, 3, 10)


def fit_bag_of_words(train_texts: Sequence[str], y_train: Any, val_texts: Sequence[str], y_val: Any):
    """TF-IDF of words and word pairs + logistic regression, C chosen on validation.

    Returns ``(vectorizer, model, C)``; notebook 06 section 3.3 explains it.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train, x_val = vectorizer.fit_transform(list(train_texts)), vectorizer.transform(list(val_texts))
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train) for c in BOW_CS}
    c = max(fits, key=lambda c: fits[c].score(x_val, y_val))
    return vectorizer, fits[c], c


def fit_probe(e_train: Any, y_train: Any, e_val: Any, y_val: Any):
    """Logistic regression on frozen sentence embeddings, C chosen on validation: ``(model, C)``."""
    from sklearn.linear_model import LogisticRegression

    fits = {c: LogisticRegression(C=c, max_iter=3000).fit(e_train, y_train) for c in PROBE_CS}
    c = max(fits, key=lambda c: fits[c].score(e_val, y_val))
    return fits[c], c


def finetune_once(encoder: nn.Module, tokenizer: Any, train_data: Any, val_data: Any, *, lr: float, seed: int,
                  sizes: Mapping[str, Any], progress: bool = False) -> tuple[nn.Module, TrainingRun]:
    """Full fine-tuning of a fresh copy of ``encoder`` as notebook 06 does it: ``(model, run)``.

    The copy, its head and its dropout are seeded with ``seed``; training is :func:`train_classifier`
    with the sizes of the profile (epochs, batch, early stopping twice per epoch).
    """
    import copy

    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder), n_classes=2, pooling="mean", dropout=0.1)
    model.to(_device_of(encoder))
    steps_per_epoch = math.ceil(len(train_data) / sizes["batch_size"])
    run = train_classifier(model, tokenizer, train_data, val_data, epochs=sizes["epochs"], lr=lr,
                           batch_size=sizes["batch_size"], max_length=sizes["max_length"], weight_decay=0.01,
                           warmup_fraction=0.1, patience=sizes["patience"], seed=seed, progress=progress,
                           eval_every=max(1, steps_per_epoch // sizes["evals_per_epoch"]))
    return model, run


def _summarise(right: Mapping[str, list], predictions: Mapping[str, list], y_test: np.ndarray) -> dict:
    table = {}
    for name, rows in right.items():
        accuracy = [float(np.mean(r)) for r in rows]
        f1 = [classification_metrics(y_test, p)["f1"] for p in predictions[name]]
        macro = [classification_metrics(y_test, p)["macro_f1"] for p in predictions[name]]
        table[name] = dict(accuracy_mean=float(np.mean(accuracy)), accuracy_sd=float(np.std(accuracy, ddof=1))
                           if len(accuracy) > 1 else 0.0, accuracy_by_seed=accuracy,
                           f1_mean=float(np.mean(f1)), macro_f1_mean=float(np.mean(macro)))
    return table


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run behind notebook 06: ``python -m course_lib.experiments finetuning``.

    For each seed s the labelled examples are ``take(train, n_label, seed=s)``, the same for the bag of
    words, the linear probe and full fine-tuning. VADER's threshold, the C of both logistic regressions
    and the fine-tuning learning rate are chosen on the validation split; the learning rate by a search
    over ``lrs`` on seed 0, after which the other seeds run at the chosen rate (seed 0's run at that
    rate is reused). Every pair of methods gets a paired bootstrap interval over test examples and
    seeds (:func:`pairwise_gaps`). Extra processes can share the fine-tuning runs (:func:`is_worker`).
    """
    from course_lib.tools.data import load_sentiment
    from course_lib.tools.profiles import code_version

    sizes = finetuning_sizes(profile, quick)
    name, profile_name = "finetuning", "quick" if quick else profile.name
    code_at_start = code_version()
    cache = _RunCache(name, profile_name, sizes, enabled=not quick)
    movies = load_sentiment("movies")
    val, test = take(movies["validation"], sizes["n_val"]), take(movies["test"], sizes["n_test"])
    ood = {d: take(load_sentiment(d)["test"], sizes["n_ood"]) for d in ("tweets", "amazon")}
    y_val, y_test = np.array(val["label"]), np.array(test["label"])
    y_ood = {d: np.array(data["label"]) for d, data in ood.items()}
    tokenizer, encoder = load_encoder(profile)
    max_length = sizes["max_length"]

    def finetune_run(lr: float, seed: int) -> dict[str, Any]:
        pool = take(movies["train"], sizes["n_label"], seed=seed)
        model, run = finetune_once(encoder, tokenizer, pool, val, lr=lr, seed=seed, sizes=sizes)
        out = dict(val_accuracy=run.best_val_accuracy, best_step=run.best_step, steps=run.steps,
                   stopped_early=run.stopped_early, seconds=run.seconds,
                   examples_per_second=run.train_examples_per_second, history=run.history,
                   test_predictions=_bits(evaluate(model, tokenizer, test, max_length=max_length)["predictions"]),
                   ood_accuracy={d: evaluate(model, tokenizer, data, max_length=max_length)["accuracy"]
                                 for d, data in ood.items()})
        _log(name, f"fine-tuning lr={lr:g} seed {seed}: validation {out['val_accuracy']:.3f} "
                   f"(best step {run.best_step} of {run.steps}) in {run.seconds:.0f} s")
        return out

    # the fine-tuning runs first, so that worker processes can share them
    searched = cache.get_many([(dict(method="full", lr=lr, seed=0), lambda lr=lr: finetune_run(lr, 0))
                               for lr in sizes["lrs"]])
    search = dict(zip(sizes["lrs"], searched))
    chosen_lr = max(sizes["lrs"], key=lambda lr: search[lr]["val_accuracy"])  # the first of equal ones
    runs = [search[chosen_lr]] + cache.get_many([(dict(method="full", lr=chosen_lr, seed=s),
                                                  lambda s=s: finetune_run(chosen_lr, s)) for s in range(1, seeds)])
    if is_worker():
        _log(name, "worker: no fine-tuning run left, exiting (the main process writes the record)")
        raise SystemExit(0)

    def embeddings(texts):
        return embed(encoder, tokenizer, list(texts), max_length=max_length).numpy()

    vader_val, vader_test = _vader(val["text"]), _vader(test["text"])
    vader_ood = {d: _vader(data["text"]) for d, data in ood.items()}
    t = vader_threshold(vader_val, y_val)
    e_val, e_test = embeddings(val["text"]), embeddings(test["text"])
    e_ood = {d: embeddings(data["text"]) for d, data in ood.items()}
    _log(name, f"VADER threshold {t:+.2f}; embedded validation, test and out-of-domain snippets")

    methods = ["majority class", "VADER (compound ≥ 0)", "VADER (tuned threshold)", "bag of words + LR",
               "linear probe (frozen MiniLM)", "fine-tuned MiniLM"]
    predictions = {m: [] for m in methods}
    transfer = {m: {d: [] for d in ood} for m in methods[1:]}
    chosen_c = {"bag of words + LR": [], "linear probe (frozen MiniLM)": []}
    for seed in range(seeds):
        pool = take(movies["train"], sizes["n_label"], seed=seed)
        y_pool = np.array(pool["label"])
        predictions["majority class"].append(np.full(len(y_test), int(np.bincount(y_pool).argmax())))
        predictions["VADER (compound ≥ 0)"].append((vader_test >= 0).astype(int))
        predictions["VADER (tuned threshold)"].append((vader_test >= t).astype(int))
        vectorizer, bow, c = fit_bag_of_words(pool["text"], y_pool, val["text"], y_val)
        predictions["bag of words + LR"].append(bow.predict(vectorizer.transform(list(test["text"]))))
        chosen_c["bag of words + LR"].append(c)
        probe, c = fit_probe(embeddings(pool["text"]), y_pool, e_val, y_val)
        predictions["linear probe (frozen MiniLM)"].append(probe.predict(e_test))
        chosen_c["linear probe (frozen MiniLM)"].append(c)
        for d, data in ood.items():
            transfer["VADER (compound ≥ 0)"][d].append(float(((vader_ood[d] >= 0) == y_ood[d]).mean()))
            transfer["VADER (tuned threshold)"][d].append(float(((vader_ood[d] >= t) == y_ood[d]).mean()))
            transfer["bag of words + LR"][d].append(
                float((bow.predict(vectorizer.transform(list(data["text"]))) == y_ood[d]).mean()))
            transfer["linear probe (frozen MiniLM)"][d].append(float((probe.predict(e_ood[d]) == y_ood[d]).mean()))
        _log(name, f"seed {seed}: baselines done (bag of words C={chosen_c['bag of words + LR'][-1]}, "
                   f"probe C={c})")
    for run in runs:
        predictions["fine-tuned MiniLM"].append(_unbits(run["test_predictions"]).astype(int))
        for d in ood:
            transfer["fine-tuned MiniLM"][d].append(run["ood_accuracy"][d])

    right = {m: [np.asarray(p) == y_test for p in predictions[m]] for m in methods}
    table = _summarise(right, predictions, y_test)
    n_pool = len(take(movies["train"], sizes["n_label"]))
    for m in methods:
        table[m]["trained_on"] = 0 if m.startswith("VADER") else n_pool  # labelled examples it learned from
    table["fine-tuned MiniLM"]["seconds_mean"] = float(np.mean([r["seconds"] for r in runs]))
    return json_ready(dict(
        sizes=sizes, seeds=seeds, n_train_split=len(movies["train"]), n_val=len(val), n_test=len(test),
        n_ood={d: len(data) for d, data in ood.items()}, code_at_start=code_at_start,
        vader_threshold=t, chosen_c=chosen_c, chosen_lr=chosen_lr,
        search=[dict(lr=lr, val_accuracy=r["val_accuracy"], best_step=r["best_step"], steps=r["steps"],
                     stopped_early=r["stopped_early"], seconds=r["seconds"],
                     test_accuracy=float((_unbits(r["test_predictions"]) == y_test).mean()))
                for lr, r in search.items()],
        runs=[{k: v for k, v in r.items() if k != "test_predictions"} | {"seed": s} for s, r in enumerate(runs)],
        table=table, gaps=pairwise_gaps({m: right[m] for m in methods}),
        run_commits=sorted({r.get("commit", "not recorded") for r in [*search.values(), *runs]}),
        transfer={m: {d: float(np.mean(v)) for d, v in by.items()} for m, by in transfer.items()},
        transfer_majority={d: float(max(y.mean(), 1 - y.mean())) for d, y in y_ood.items()},
        right={m: [_bits(r) for r in right[m]] for m in methods},
    ))


def lora_experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run behind notebook 07: ``python -m course_lib.experiments lora`` (it calls this).

    Methods that differ only in what trains -- the head alone (linear probe), biases (BitFit), LoRA on
    ``query`` and ``value`` at every rank of ``ranks`` with alpha = alpha_over_r * r (the same scale
    alpha / r at every rank), everything (full fine-tuning) -- trained by :func:`train_fixed_steps` on
    the same labelled examples ``take(train, n_train, seed=s)`` for the same number of steps. Each
    method family's learning rate is chosen on the validation split by a search on seed 0 (LoRA's at
    ``search_rank``, then used at every rank); the other seeds run at the chosen rates. Every pair of
    methods, and each against VADER, gets a paired bootstrap interval over test examples and seeds.
    """
    import copy

    from course_lib.parts import lora
    from course_lib.tools.data import load_sentiment
    from course_lib.tools.profiles import code_version

    sizes = lora_sizes(profile, quick)
    name, profile_name = "lora", "quick" if quick else profile.name
    code_at_start = code_version()
    cache = _RunCache(name, profile_name, sizes, enabled=not quick)
    movies = load_sentiment("movies")
    val, test = take(movies["validation"], sizes["n_val"]), take(movies["test"], sizes["n_test"])
    y_test = np.array(test["label"])
    tokenizer, encoder = load_encoder(profile)
    n_train = len(take(movies["train"], sizes["n_train"]))
    steps = sizes["steps"] or math.ceil(sizes["epochs"] * n_train / sizes["batch_size"])

    def family(method: str) -> str:
        return "LoRA" if method.startswith("LoRA") else method

    def build(method: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = SentenceClassifier(copy.deepcopy(encoder)).to(_device_of(encoder))
        if method == "linear probe":
            return model.freeze_encoder()
        if method == "BitFit":
            return lora.apply_bitfit(model, trainable_extra=["head"])
        if method.startswith("LoRA"):
            r = int(method.split("=")[1])
            return lora.apply_lora(model, list(LORA_TARGETS), r=r, alpha=sizes["alpha_over_r"] * r,
                                   trainable_extra=["head"])
        return model

    frozen: dict[Any, torch.Tensor] = {}  # the probe's embeddings, computed once per split and seed

    def embeddings(key: Any, data: Any) -> torch.Tensor:
        if key not in frozen:
            tick = time.perf_counter()
            frozen[key] = embed(encoder, tokenizer, list(data["text"]), max_length=sizes["max_length"])
            frozen[("seconds", key)] = time.perf_counter() - tick
        return frozen[key]

    def probe_run(lr: float, seed: int, with_val: bool) -> dict[str, Any]:
        pool = take(movies["train"], sizes["n_train"], seed=seed)
        model = build("linear probe", seed)
        e_pool = embeddings(("train", seed), pool)
        out = train_head_on_embeddings(model, e_pool, pool["label"], lr=lr, steps=steps,
                                       batch_size=sizes["batch_size"], seed=seed)
        out["embed_seconds"] = frozen[("seconds", ("train", seed))]
        with torch.no_grad():
            if with_val:
                out["val_accuracy"] = float((model.head(embeddings("val", val)).argmax(-1).numpy()
                                             == np.array(val["label"])).mean())
            out["test_predictions"] = _bits(model.head(embeddings("test", test)).argmax(-1).numpy())
        return out

    def one_run(method: str, lr: float, seed: int, with_val: bool) -> dict[str, Any]:
        if method == "linear probe":
            out = probe_run(lr, seed, with_val)
        else:
            model = build(method, seed)
            out = train_fixed_steps(model, tokenizer, take(movies["train"], sizes["n_train"], seed=seed), lr=lr,
                                    steps=steps, batch_size=sizes["batch_size"], max_length=sizes["max_length"],
                                    seed=seed)
            if with_val:
                out["val_accuracy"] = evaluate(model, tokenizer, val, max_length=sizes["max_length"])["accuracy"]
            out["test_predictions"] = _bits(evaluate(model, tokenizer, test,
                                                     max_length=sizes["max_length"])["predictions"])
        _log(name, f"{method} lr={lr:g} seed {seed}: "
                   + (f"validation {out['val_accuracy']:.3f}, " if with_val else "")
                   + f"test {float((_unbits(out['test_predictions']) == y_test).mean()):.3f}, {out['seconds']:.0f} s")
        return out

    def item(method: str, lr: float, seed: int, with_val: bool = False) -> tuple[dict[str, Any], Any]:
        return (dict(method=method, lr=lr, seed=seed, with_val=with_val),
                lambda: one_run(method, lr, seed, with_val))

    search_method = {"linear probe": "linear probe", "BitFit": "BitFit", "LoRA": f"LoRA r={sizes['search_rank']}",
                     "full fine-tuning": "full fine-tuning"}
    methods = ["linear probe", "BitFit", *[f"LoRA r={r}" for r in sizes["ranks"]], "full fine-tuning"]
    planned = [(m, s) for m in methods for s in range(seeds) if not (s == 0 and m == search_method[family(m)])]
    search_items = {fam: [item(search_method[fam], lr, 0, with_val=True) for lr in sizes["lrs"][fam]]
                    for fam in search_method}

    def chosen(fam: str) -> float:
        values = [cache.done[cache.key(settings)] for settings, _ in search_items[fam]]
        return max(zip(sizes["lrs"][fam], values), key=lambda pair: pair[1]["val_accuracy"])[0]  # first of equals

    # every search run first; a family's other seeds as soon as its own search is finished
    while True:
        cache.reload()
        finished = [fam for fam, items in search_items.items() if all(cache.has(st) for st, _ in items)]
        seed_items = [item(m, chosen(family(m)), s) for m, s in planned if family(m) in finished]
        if len(finished) == len(search_items) and all(cache.has(st) for st, _ in seed_items):
            break
        if not cache.work_on_one([it for items in search_items.values() for it in items] + seed_items):
            time.sleep(15)
    chosen_lr = {fam: chosen(fam) for fam in search_items}
    search = {fam: {lr: cache.done[cache.key(st)] for lr, (st, _) in zip(sizes["lrs"][fam], items)}
              for fam, items in search_items.items()}
    done = {(m, s): cache.done[cache.key(item(m, chosen_lr[family(m)], s)[0])] for m, s in planned}
    if is_worker():
        _log(name, "worker: no run left, exiting (the main process writes the record)")
        raise SystemExit(0)
    results = {m: [search[family(m)][chosen_lr[family(m)]] if (m, s) not in done else done[(m, s)]
                   for s in range(seeds)] for m in methods}

    vader_right = (_vader(test["text"]) >= 0).astype(int) == y_test
    right = {m: [_unbits(r["test_predictions"]) == y_test for r in rows] for m, rows in results.items()}
    predictions = {m: [_unbits(r["test_predictions"]).astype(int) for r in rows] for m, rows in results.items()}
    table = _summarise(right, predictions, y_test)
    for m, rows in results.items():
        if m == "linear probe":
            table[m]["embed_seconds_mean"] = float(np.mean([r["embed_seconds"] for r in rows]))
        table[m].update(lr=chosen_lr[family(m)], trainable=rows[0]["trainable"], adam_bytes=rows[0]["adam_bytes"],
                        step_ms=float(np.median([r["step_ms"] for r in rows])),
                        seconds_mean=float(np.mean([r["seconds"] for r in rows])))
    gaps = pairwise_gaps({**right, "VADER (compound ≥ 0)": [vader_right] * seeds})
    return json_ready(dict(
        sizes=sizes, seeds=seeds, steps=steps, n_train=n_train, n_val=len(val), n_test=len(test),
        targets=list(LORA_TARGETS), code_at_start=code_at_start, chosen_lr=chosen_lr,
        search={fam: [dict(lr=lr, method=search_method[fam], val_accuracy=r["val_accuracy"],
                           test_accuracy=float((_unbits(r["test_predictions"]) == y_test).mean()))
                      for lr, r in by_lr.items()] for fam, by_lr in search.items()},
        table=table, vader_accuracy=float(vader_right.mean()), gaps=gaps,
        run_commits=sorted({r.get("commit", "not recorded") for rows in results.values() for r in rows}
                           | {r.get("commit", "not recorded") for by_lr in search.values() for r in by_lr.values()}),
        right={m: [_bits(r) for r in rows] for m, rows in right.items()},
    ))
