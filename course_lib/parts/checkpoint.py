"""Checkpoints of the training loop: model weights, optimiser state, step and random-number-generator states in
one ``safetensors`` file (no pickles), so that an interrupted run resumes exactly where it stopped.

Explained in notebooks/04_training_a_language_model.ipynb ("Checkpoints"); written and read by
``course_lib.parts.loop``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint"]


CHECKPOINT_NAME = "checkpoint.safetensors"



_FORMAT = "course_lib.train/1"



def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model



def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, *, generator: torch.Generator | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write model weights, optimiser state, ``step`` and RNG states to one safetensors file.

    Tensors: ``model.<name>``, ``optim.<i>.<key>`` (the optimiser state of parameter i), ``rng.*``.
    Everything else (step, the optimiser's hyper-parameters, ``metadata``) is JSON in the header.
    Written to a temporary file first and renamed, so an interruption never leaves half a checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in _unwrap(model).state_dict().items()}
    header: dict[str, str] = {"format": _FORMAT, "step": str(step), "metadata": json.dumps(metadata or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        header["optim_param_groups"] = json.dumps(state["param_groups"])
        header["optim_scalars"] = json.dumps(scalars)
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["rng.batches"] = generator.get_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path



def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, generator: torch.Generator | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``,
    ``generator``); returns ``{"step": int, "metadata": dict}``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train with checkpoint_dir=... first.")
    try:
        opened = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors checkpoint ({error}): pass the file save_checkpoint wrote "
                         f"({CHECKPOINT_NAME} in the checkpoint_dir of the run).") from None
    with opened as f:
        header = f.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a course_lib.train checkpoint (format {header.get('format')!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    _unwrap(model).load_state_dict(model_state)
    if optimizer is not None:
        _load_optimizer(path, header, tensors, optimizer)
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if "rng.torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    if generator is not None and "rng.batches" in tensors:
        generator.set_state(tensors["rng.batches"])
    return {"step": int(header["step"]), "metadata": json.loads(header.get("metadata", "{}"))}



def _load_optimizer(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> None:
    if "optim_param_groups" not in header:
        raise ValueError(f"{path} holds no optimiser state; pass optimizer=None to load the weights only.")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in json.loads(header["optim_scalars"]).items():
        state.setdefault(int(index), {}).update(entries)
    groups = json.loads(header["optim_param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
