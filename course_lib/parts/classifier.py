"""Fine-tuning a pretrained encoder for sentence classification.

Explained in notebooks/06_finetuning.ipynb; reused by notebooks/07_lora.ipynb.

The pieces, with the symbols of the notebook:

* ``mean_pool(H, m)``: the sentence embedding e = Σ_t m_t H_t / Σ_t m_t, an average over the real
  tokens only (m is the attention mask, 1 for a token and 0 for padding).
* :class:`SentenceClassifier`: encoder → pooling → dropout → a linear head, logits z = W e + b.
* :func:`embed`: frozen-encoder embeddings for a linear probe.
* :func:`train_classifier`: the course's loop (``course_lib.parts.loop``) with a classifier's batches and
  loss: AdamW, linear warm-up then linear decay, gradient clipping, and early stopping on the
  validation accuracy (the best weights are restored at the end); :func:`train_fixed_steps` and
  :func:`train_head_on_embeddings` train for a fixed number of steps (lesson 07's comparisons).
* :func:`classification_metrics` and :func:`evaluate`: accuracy, precision, recall, F1 of the positive
  class, macro-F1 and the confusion matrix (rows: true class, columns: predicted class).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib.parts.loop import History, LoopConfig, linear_schedule, train

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
                            "(load one with course_lib.parts.classifier.load_encoder).")
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
# Training through the course's loop: what differs is only the batches and the loss
# ----------------------------------------------------------------------------------------------


def classification_loss(model: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the classifier's logits on one batch ``(inputs, labels)``."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(**inputs), labels)


def _tokens_in(batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> int:
    return int(batch[0]["attention_mask"].sum())


def _encoded(tokenizer: Any, texts: list[str], labels: torch.Tensor, index: Sequence[int], max_length: int,
             device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = tokenize(tokenizer, [texts[i] for i in index], max_length)
    return {k: v.to(device) for k, v in batch.items()}, labels[index].to(device)


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
    """Fine-tune the trainable parameters of ``model`` with cross-entropy and AdamW (lesson 06).

    Batches are drawn epoch by epoch from a permutation seeded by ``seed``. The learning rate warms up
    over ``warmup_fraction`` of the steps and then decays linearly to 0, written the usual ``LambdaLR`` way
    (``linear_schedule(offset=0)``: the first step has rate 0). Every ``eval_every`` steps (default: once
    per epoch) the model is evaluated on ``val_data``; when the validation accuracy has not improved for
    ``patience`` evaluations in a row, training stops early. Either way the weights of the best
    evaluation are restored. Training runs ``epochs`` passes over ``train_data`` or ``max_steps`` steps,
    whichever is fewer.
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
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed)
    seen = 0

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        nonlocal seen
        while True:
            for index in torch.randperm(len(texts), generator=generator).split(batch_size):
                seen += len(index)
                yield _encoded(tokenizer, texts, labels, index, max_length, device)

    def validate(m: nn.Module) -> dict[str, float]:
        val = evaluate(m, tokenizer, val_data, batch_size=2 * batch_size, max_length=max_length)
        return dict(val_loss=val["loss"], val_accuracy=val["accuracy"], val_f1=val["f1"])

    config = LoopConfig(steps=total, lr=lr, schedule=linear_schedule(lr, round(warmup_fraction * total), total,
                                                                    offset=0),
                        weight_decay=weight_decay, betas=(0.9, 0.999), grad_clip=clip_norm or None,
                        eval_every=eval_every or min(steps_per_epoch, total), keep_best="val_accuracy",
                        patience=patience, log_every=total, progress=progress, desc="fine-tuning")
    history = train(model, batches(), classification_loss, config, evaluate=validate, tokens_in=_tokens_in)
    return _training_run(history, config.lr_schedule(), steps_per_epoch, seen)


def _training_run(history: History, schedule: Any, steps_per_epoch: int, seen: int) -> TrainingRun:
    run = TrainingRun(steps=history.steps_done, stopped_early=history.stopped_early,
                      seconds=history.seconds + history.eval_seconds)
    run.train_examples_per_second = seen / run.seconds if run.seconds else 0.0
    previous = 0
    for row in history.evals:
        step = row["step"]
        losses = history.losses[previous:step]
        run.history.append(dict(step=step, epoch=step / steps_per_epoch, lr=schedule(step - 1),
                                train_loss=sum(losses) / len(losses), val_loss=row["val_loss"],
                                val_accuracy=row["val_accuracy"], val_f1=row["val_f1"]))
        previous = step
    best = [row for row in history.evals if row["step"] == history.best_step]
    run.best_step = history.best_step or 0
    run.best_val_accuracy = best[0]["val_accuracy"] if best else float("nan")
    return run


def as_dataset(texts: Sequence[str], labels: Sequence[int] | torch.Tensor) -> Mapping[str, list]:
    """A minimal ``{'text', 'label'}`` mapping that every function here accepts as data."""
    return {"text": list(texts), "label": [int(y) for y in labels]}


def _fixed_step_result(model: nn.Module, history: History) -> dict[str, Any]:
    timed = sorted(history.step_seconds[1:] or history.step_seconds)   # the first step allocates Adam's state
    return dict(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                adam_bytes=history.optimizer_bytes, step_ms=1000 * timed[len(timed) // 2],
                final_loss=float(np.mean(history.losses[-5:])), seconds=history.seconds,
                losses=[float(x) for x in history.losses])


def _fixed_step_config(lr: float, steps: int, weight_decay: float, warmup_fraction: float, clip_norm: float,
                       progress: bool) -> LoopConfig:
    if not (isinstance(steps, int) and steps >= 1 and lr > 0):
        raise ValueError(f"need steps >= 1 (an int) and lr > 0, got steps={steps!r}, lr={lr!r}.")
    return LoopConfig(steps=steps, lr=lr, schedule=linear_schedule(lr, max(1, round(warmup_fraction * steps)), steps),
                      weight_decay=weight_decay, betas=(0.9, 0.999), grad_clip=clip_norm or None, log_every=steps,
                      time_steps=True, progress=progress)


def train_fixed_steps(model: nn.Module, tokenizer: Any, train_data: Any, *, lr: float, steps: int,
                      batch_size: int = 16, max_length: int = 64, weight_decay: float = 0.0,
                      warmup_fraction: float = 0.1, clip_norm: float = 1.0, seed: int = 0,
                      progress: bool = False) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` for exactly ``steps`` AdamW steps, no early stopping.

    Notebook 07 compares methods that differ only in *what* trains (head, biases, LoRA, everything), so
    they share this: the same batch order for a given ``seed`` (one permutation, cycled), linear warm-up
    over ``warmup_fraction`` of the steps then linear decay, gradient clipping. Returns the number of
    trainable parameters, the bytes of Adam's state (measured after training), the median step time in
    ms (the first step, which allocates the optimiser state, left out), the mean loss of the last five
    steps, the loss of every step (``losses``) and the seconds of the whole run.
    """
    texts, labels = texts_and_labels(train_data)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    config = _fixed_step_config(lr, steps, weight_decay, warmup_fraction, clip_norm, progress)
    device = _device_of(model)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = (_encoded(tokenizer, texts, labels, [order[(step * batch_size + i) % len(order)]
                                                   for i in range(batch_size)], max_length, device)
               for step in itertools.count())
    history = train(model, batches, classification_loss, config, tokens_in=_tokens_in)
    return _fixed_step_result(model, history)


def train_head_on_embeddings(model: nn.Module, e_train: torch.Tensor, y_train: Any, *, lr: float, steps: int,
                             batch_size: int = 16, weight_decay: float = 0.0, warmup_fraction: float = 0.1,
                             clip_norm: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The linear probe of notebook 07 on pre-computed sentence embeddings ``e_train`` (N, H).

    With the encoder frozen its output never changes, so it is computed once (:func:`embed`, eval
    mode) instead of at every step; the head (dropout, then ``model.head``) trains with the loop,
    schedule and batch order of :func:`train_fixed_steps`. Returns the same fields.
    """
    labels = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    if any(p.requires_grad for p in model.encoder.parameters()):
        raise ValueError("train_head_on_embeddings trains the head alone: freeze the encoder first "
                         "(model.freeze_encoder()).")
    config = _fixed_step_config(lr, steps, weight_decay, warmup_fraction, clip_norm, False)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = ([order[(step * batch_size + i) % len(order)] for i in range(batch_size)] for step in itertools.count())

    def head_loss(m: nn.Module, index: list[int]) -> torch.Tensor:
        return nn.functional.cross_entropy(m.head(m.dropout(e_train[index])), labels[index])

    history = train(model, batches, head_loss, config)
    return _fixed_step_result(model, history)
