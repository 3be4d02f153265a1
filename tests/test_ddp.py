"""course_lib.distributed.ddp: DDP on two real processes equals one process with the whole batch; ZeRO memory
arithmetic against the ZeRO paper; the accelerate example on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib.distributed import ddp, launch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# memory per GPU: Rajbhandari et al. 2020 (ZeRO), Fig. 1 -- 7.5B parameters, 64 data-parallel GPUs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_memory_reproduces_zero_figure_1(stage, expected_gb):
    total = ddp.memory_per_gpu(7.5e9, data=64, zero_stage=stage)["total"]
    assert total == pytest.approx(expected_gb, abs=0.05)


def test_memory_parts_follow_the_16_bytes_rule():
    m = ddp.memory_per_gpu(1e9)
    assert (m["weights"], m["gradients"], m["optimizer"], m["total"]) == pytest.approx((2, 2, 12, 16))
    # model parallelism splits everything; ZeRO-3 over N ranks is the same per-GPU total as N-way TP
    assert ddp.memory_per_gpu(70e9, tensor=8)["total"] == pytest.approx(16 * 70e9 / 8 / 1e9)
    assert ddp.memory_per_gpu(70e9, tensor=4, pipeline=2)["total"] == pytest.approx(
        ddp.memory_per_gpu(70e9, data=8, zero_stage=3)["total"])
    # ZeRO does nothing without data-parallel ranks to shard over
    assert ddp.memory_per_gpu(7e9, data=1, zero_stage=3) == ddp.memory_per_gpu(7e9)


def test_gpus_needed():
    assert ddp.gpus_needed(135e6) == 1                          # 16 x 0.135 = 2.16 GB: one GPU
    assert ddp.gpus_needed(7e9) is None                         # 112 GB replicated on every rank
    assert ddp.gpus_needed(7e9, zero_stage=1) == 2              # 14 + 14 + 84 / 2 = 70 GB
    assert ddp.gpus_needed(7e9, zero_stage=3) == 2              # 112 / 2 = 56 GB
    assert ddp.gpus_needed(70e9, zero_stage=3) == 14            # 1120 / 14 = 80 GB
    assert ddp.gpus_needed(70e9, zero_stage=2) is None          # the 140 GB of bf16 weights stay replicated
    assert ddp.gpus_needed(70e9, zero_stage=2, tensor=8) == 2   # 17.5 + 122.5 / 2 = 78.75 GB
    with pytest.raises(ValueError, match="gpu_gb must be positive"):
        ddp.gpus_needed(7e9, gpu_gb=0)


def test_gpus_needed_agrees_with_brute_force():
    for n, stage, degrees in [(7e9, 1, {}), (70e9, 2, {"tensor": 8}), (13e9, 2, {}), (175e9, 3, {})]:
        found = ddp.gpus_needed(n, zero_stage=stage, **degrees)
        first = next((d for d in range(1, 4097)
                      if ddp.memory_per_gpu(n, data=d, zero_stage=stage, **degrees)["total"] <= 80), None)
        assert found == first


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_params=-1), "n_params must be a positive number"),
    (dict(n_params=1e9, zero_stage=4), "zero_stage must be 0"),
    (dict(n_params=1e9, data=0), "data (a parallel degree) must be a positive integer"),
    (dict(n_params=1e9, tensor=2.5), "tensor (a parallel degree) must be a positive integer"),
])
def test_memory_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ddp.memory_per_gpu(**kwargs)


# ---------------------------------------------------------------------------------------------
# the pieces of the DDP run, in one process
# ---------------------------------------------------------------------------------------------

def test_spec_validation():
    with pytest.raises(ValueError, match="batch_per_rank must be a positive integer"):
        ddp.DDPSpec(batch_per_rank=0)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        ddp.DDPSpec(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        ddp.DDPSpec(dtype="bfloat16")


def test_sgd_seeds_and_the_script_arguments():
    spec = ddp.DDPSpec(optimizer="sgd", lr=0.5, steps=2)
    model = ddp.make_model(spec)
    assert isinstance(ddp.make_optimizer(model, spec), torch.optim.SGD)
    assert isinstance(ddp.make_optimizer(model, ddp.DDPSpec()), torch.optim.AdamW)
    other = ddp.make_model(spec, seed=spec.seed + 1)
    assert ddp.max_abs_difference(ddp.weights_of(ddp.make_model(spec, seed=spec.seed)), ddp.weights_of(model)) == 0
    assert ddp.max_abs_difference(ddp.weights_of(other), ddp.weights_of(model)) > 0
    parsed, out = ddp.script_arguments(["--out", "runs/x", *ddp.spec_arguments(spec)])
    assert parsed == spec and str(out) == "runs/x"
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'sgd'"):
        ddp.DDPSpec(optimizer="adam")
    # plain SGD: one step is lr times the gradient, so a gradient twice too large shows in the weights
    single, _ = ddp.train_single(ddp.DDPSpec(optimizer="sgd", lr=0.5, steps=1), world_size=2)
    doubled, _ = ddp.train_single(ddp.DDPSpec(optimizer="sgd", lr=1.0, steps=1), world_size=2)
    start = ddp.weights_of(ddp.make_model(spec))
    for name in start:
        torch.testing.assert_close(doubled[name] - start[name], 2 * (single[name] - start[name]), rtol=1e-4, atol=1e-6)


def test_backend_follows_the_device():
    assert launch.backend_for("cpu") == "gloo"
    assert launch.backend_for(torch.device("cuda", 0)) == "nccl"


def test_global_batches_are_the_same_in_every_process_and_split_cleanly():
    spec = ddp.DDPSpec(steps=2, batch_per_rank=3)
    a, b = ddp.global_batches(spec, 2), ddp.global_batches(spec, 2)
    assert len(a) == 2 and a[0][0].shape == (6, spec.context)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x, y = a[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_averaged_shard_gradients_equal_the_full_batch_gradient():
    """The identity DDP relies on, checked with plain autograd: mean of the per-rank gradients
    (each rank's loss a mean over its own equal-sized shard) = gradient of the full-batch mean loss."""
    spec = ddp.DDPSpec(dtype="float64")
    model = ddp.make_model(spec)
    x, y = ddp.global_batches(spec, 2)[0]
    full = torch.autograd.grad(model(x, y)[1], list(model.parameters()))
    halves = [torch.autograd.grad(model(x[s], y[s])[1], list(model.parameters()))
              for s in (slice(0, 4), slice(4, 8))]
    for g, g0, g1 in zip(full, *halves):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=0, atol=1e-14)


def test_max_abs_difference_and_its_errors():
    a = {"w": torch.zeros(2, 2)}
    assert ddp.max_abs_difference(a, {"w": torch.full((2, 2), 0.5)}) == 0.5
    with pytest.raises(ValueError, match="different tensors"):
        ddp.max_abs_difference(a, {"v": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="has shape"):
        ddp.max_abs_difference(a, {"w": torch.zeros(3)})


def test_errors_outside_torchrun(tmp_path, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="needs a running process group"):
        ddp.time_all_reduce([16])
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        ddp.launch(tmp_path, nproc=0)
    with pytest.raises(FileNotFoundError, match="run course_lib.distributed.ddp.launch"):
        ddp.load_weights(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    assert ddp.main(["--out", str(tmp_path)]) == 2
    assert "runs under torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# two real processes
# ---------------------------------------------------------------------------------------------

def test_ddp_on_two_processes_equals_one_process_with_twice_the_batch(tmp_path):
    from course_lib.distributed import data_parallel

    spec = ddp.DDPSpec(dtype="float64")
    result = ddp.launch(tmp_path, nproc=2, spec=spec, allreduce_numels=[256, 4096], script=data_parallel.__file__)
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["device"] == "cpu"
    rank0, rank1 = ddp.load_weights(tmp_path, 0), ddp.load_weights(tmp_path, 1)
    assert ddp.max_abs_difference(rank0, rank1) == 0.0  # the replicas stay identical
    reference, losses = ddp.train_single(spec, world_size=2)
    assert ddp.max_abs_difference(rank0, reference) < 1e-12  # in float64: equal up to rounding
    assert result["losses"] == pytest.approx(losses, abs=1e-6)
    # data parallelism written out by hand (exercise 10.2's reference), run first in the same job: the same steps
    by_hand = [ddp.load_weights(tmp_path / "script", r) for r in range(2)]
    assert ddp.max_abs_difference(by_hand[0], by_hand[1]) == 0.0
    assert ddp.max_abs_difference(by_hand[0], reference) < 1e-12
    assert result["script_losses"] == pytest.approx(losses, abs=1e-6)   # the loop keeps losses in float32
    start = ddp.make_model(spec)
    assert max((p.detach() - reference[n]).abs().max().item() for n, p in start.named_parameters()) > 1e-4
    sizes = [row["numel"] for row in result["all_reduce"]]
    assert sizes == sorted({256, 4096, result["gradient_numel"]})
    assert all(row["seconds"] > 0 and row["busbw_bytes_per_s"] == pytest.approx(row["algbw_bytes_per_s"])
               for row in result["all_reduce"])  # 2 ranks: bus bandwidth = 2(W-1)/W x algbw = algbw
    phases = result["phases"]  # where the launch's seconds went, from the ranks' time stamps
    assert list(phases) == [name for _, name in launch.PHASES] + ["ending the job"]
    # one phase can read 0.0 (importing torch did once, in a full make test); the whole job cannot
    assert all(s >= 0 for s in phases.values()) and sum(phases.values()) > 0.5


def test_accelerate_launch_on_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` of notebooks/accelerate_train.py on CPUs."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("the accelerate command is not installed next to this Python")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "notebooks" / "accelerate_train.py"),
         "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 3: loss" in done.stdout
    info = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
    reference, losses = ddp.train_single(ddp.DDPSpec(), world_size=2)
    assert ddp.max_abs_difference(load_file(str(tmp_path / "run" / "weights.safetensors")), reference) < 1e-5
    assert info["losses"] == pytest.approx(losses, abs=1e-5)
