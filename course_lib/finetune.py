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

import math
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

    ``name`` is a course asset (fetched and verified through :mod:`course_lib.assets`), a local folder,
    or a Hugging Face Hub id, which ``from_pretrained`` then downloads itself.
    """
    from transformers import AutoModel, AutoTokenizer

    from course_lib.assets import model_path

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
                            "(load one with course_lib.finetune.load_encoder).")
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
    ``level`` of the resampled gaps. Notebooks 06 and 07 compare trained models with VADER this way.
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
    linearly to 0 at ``total_steps`` (the schedule of BERT fine-tuning, Devlin et al. 2019, App. A.2)."""
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
