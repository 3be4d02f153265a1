"""The checks that launch a script a student wrote on two processes -- 10.2 (data parallelism by hand) and 11.1
(Megatron's f, g and split MLP) -- accept right scripts and refuse the common wrong ones, each with its sentence.

Every script of both catalogues runs in ONE torchrun launch (``launch.launch_scripts``: the two processes start
and import torch once, instead of ~7 s per script); the check itself is then called on each script with its
launch replaced by that run's folder, so the whole check runs: reading the script, judging what its ranks
wrote. What happens before a launch (no file, a stub, a script that uses the reference) needs no launch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError
from course_lib.checks import scripts as check_scripts
from course_lib.distributed import data_parallel, ddp, launch, megatron_mlp

REF_10 = Path(data_parallel.__file__).read_text()
REF_11 = Path(megatron_mlp.__file__).read_text()


def edit(source: str, *replacements: tuple[str, str]) -> str:
    """``source`` with each (old, new) replaced once; the old text must be there (the catalogue follows the
    reference script)."""
    for old, new in replacements:
        assert source.count(old) == 1, f"the reference script no longer contains {old!r}"
        source = source.replace(old, new)
    return source


# ---------------------------------------------------------------------------------------------
# 10.2: data parallelism by hand
# ---------------------------------------------------------------------------------------------

SHARD = '''    b = batch.shape[0] // world
    return batch[rank * b:(rank + 1) * b]'''
BROADCAST = '''            dist.broadcast(p, src=0)'''
AVERAGE = '''        dist.all_reduce(p.grad)      # the sum over the ranks, in place, on every rank
        p.grad /= world'''

DDP_RIGHT = {
    "the reference": REF_10,
    "interleaved rows, one flat all-reduce, the state dict broadcast": edit(
        REF_10, (SHARD, "    return batch[rank::world]"),
        ('''    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, src=0)''', '''    for tensor in model.state_dict().values():
        dist.broadcast(tensor, 0)'''),
        ('''    for p in model.parameters():
        dist.all_reduce(p.grad)      # the sum over the ranks, in place, on every rank
        p.grad /= world''', '''    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads])      # one bucket, one message
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))''')),
    "tensor_split and in-place division": edit(
        REF_10, (SHARD, "    return torch.tensor_split(batch, world)[rank]"),
        (AVERAGE, '''        dist.all_reduce(p.grad.data)
        p.grad.div_(dist.get_world_size())''')),
}

DDP_WRONG = {
    "sum without dividing": (edit(REF_10, (AVERAGE, "        dist.all_reduce(p.grad)")),
                             "without dividing by the world size"),
    "weights all-reduced instead of gradients": (edit(REF_10, (AVERAGE, "        dist.all_reduce(p.data)")),
                                                 "you all-reduced the weights instead of the gradients"),
    "weights averaged instead of gradients": (edit(REF_10, (AVERAGE, '''        dist.all_reduce(p.data)
        p.data /= world''')), "you averaged the weights instead of the gradients"),
    "no broadcast, per-rank seeds": (edit(REF_10, (BROADCAST, "            pass")),
                                     "rank 1 started from its own random weights"),
    "every rank reads the whole batch": (edit(REF_10, (SHARD, "    return batch")),
                                         "every rank trained on the whole global batch"),
    "no averaging at all": (edit(REF_10, (AVERAGE, "        pass")), "each rank stepped with its own gradient"),
    "broadcast from the last rank": (edit(REF_10, (BROADCAST, "            dist.broadcast(p, src=dist.get_world_size() - 1)")),
                                     "started from rank 1's weights"),
    "divided twice": (edit(REF_10, (AVERAGE, '''        dist.all_reduce(p.grad)
        p.grad /= world * world''')), "divided by the world size twice"),
    "the same rows on every rank": (edit(REF_10, (SHARD, '''    b = batch.shape[0] // world
    return batch[:b]''')), "overlapping rows"),
    "twice the rows on rank 0": (edit(REF_10, (SHARD, '''    b = batch.shape[0] // world
    return batch[rank * b:(rank + 2) * b]''')), "rank 0 trained on 4 rows"),
    "a typo": (edit(REF_10, (AVERAGE, '''        dist.all_reduce(p.grad)
        p.grad /= wrld''')), "your script failed on 2 processes: NameError: name 'wrld' is not defined"),
    "nothing saved": (edit(REF_10, ("    ddp.save_run(out, rank, start=start, model=model, batches=batches, "
                                    "losses=history.losses)\n", "")), "did not write start_rank0.safetensors"),
}


# ---------------------------------------------------------------------------------------------
# 11.1: Megatron's f, g and the MLP split by columns, then rows
# ---------------------------------------------------------------------------------------------

F_FORWARD = "        return x.view_as(x)"
F_BACKWARD = '''        grad = grad.clone()
        dist.all_reduce(grad)             # every rank used x: its gradient is the sum of the ranks' parts
        return grad'''
G_FORWARD = '''        x = x.clone()
        dist.all_reduce(x)
        return x'''
G_BACKWARD = "        return grad                       # every rank already holds the whole output gradient"
MINE = "        mine = slice(rank * d_ff // world, (rank + 1) * d_ff // world)   # this rank's columns of A = rows of fc.weight"
FORWARD = "        return SumOverRanks.apply(F.linear(h, self.proj.weight)) + self.proj.bias"

MLP_RIGHT = {
    "the reference": REF_11,
    "torch.chunk, parameters by hand, F.linear": edit(REF_11, ('''        self.fc = nn.Linear(d, d_ff // world)
        self.proj = nn.Linear(d_ff // world, d)
        with torch.no_grad():
            self.fc.weight.copy_(mlp.fc.weight[mine])
            self.fc.bias.copy_(mlp.fc.bias[mine])
            self.proj.weight.copy_(mlp.proj.weight[:, mine])          # its rows of B = columns of proj.weight
            self.proj.bias.copy_(mlp.proj.bias)                        # whole: added once, after the sum''',
        '''        self.fc, self.proj = nn.Module(), nn.Module()
        take = lambda t, dim: nn.Parameter(t.detach().chunk(world, dim=dim)[rank].clone())
        self.fc.weight, self.fc.bias = take(mlp.fc.weight, 0), take(mlp.fc.bias, 0)
        self.proj.weight = take(mlp.proj.weight, 1)
        self.proj.bias = nn.Parameter(mlp.proj.bias.detach().clone())'''),
        ("        h = F.gelu(self.fc(CopyToRanks.apply(x)))",
         "        h = F.gelu(F.linear(CopyToRanks.apply(x), self.fc.weight, self.fc.bias))")),
    "a contiguous gradient and the bias inside one expression": edit(
        REF_11, (F_BACKWARD, '''        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out'''), (FORWARD, "        return torch.add(SumOverRanks.apply(h @ self.proj.weight.T), self.proj.bias)")),
}

MLP_WRONG = {
    "f all-reduces forward too": (edit(REF_11, (F_FORWARD, '''        x = x.clone()
        dist.all_reduce(x)
        return x''')), "f all-reduced the input in its forward pass too"),
    "g all-reduces backward too": (edit(REF_11, (G_BACKWARD, '''        grad = grad.clone()
        dist.all_reduce(grad)
        return grad''')), "g all-reduced the output's gradient in its backward pass too"),
    "no all-reduce in f's backward": (edit(REF_11, (F_BACKWARD, "        return grad")),
                                      "f's backward must all-reduce"),
    "fc split on the wrong dimension": (edit(REF_11, ('''        self.fc = nn.Linear(d, d_ff // world)''',
                                                      '''        cut = slice(rank * d // world, (rank + 1) * d // world)
        self.fc = nn.Linear(d // world, d_ff)'''), ('''            self.fc.weight.copy_(mlp.fc.weight[mine])
            self.fc.bias.copy_(mlp.fc.bias[mine])''', '''            self.fc.weight.copy_(mlp.fc.weight[:, cut])
            self.fc.bias.copy_(mlp.fc.bias)''')), "split fc.weight along dim 1"),
    "proj split on the wrong dimension": (edit(REF_11, ('''        self.proj = nn.Linear(d_ff // world, d)''',
                                                        '''        cut = slice(rank * d // world, (rank + 1) * d // world)
        self.proj = nn.Linear(d_ff, d // world)'''), ('''            self.proj.weight.copy_(mlp.proj.weight[:, mine])          # its rows of B = columns of proj.weight
            self.proj.bias.copy_(mlp.proj.bias)                        # whole: added once, after the sum''',
                                                      '''            self.proj.weight.copy_(mlp.proj.weight[cut])
            self.proj.bias.copy_(mlp.proj.bias[cut])''')), "split proj.weight along dim 0"),
    "the row-parallel bias on every rank": (edit(REF_11, (FORWARD, "        return SumOverRanks.apply(self.proj(h))")),
                                            "proj's bias was added on every rank before g"),
    "g averages": (edit(REF_11, (G_FORWARD, '''        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()''')), "the mean of the ranks' partial outputs"),
    "no g": (edit(REF_11, (FORWARD, "        return F.linear(h, self.proj.weight) + self.proj.bias")),
             "only its own partial output"),
    "fc's bias kept whole": (edit(REF_11, ("            self.fc.bias.copy_(mlp.fc.bias[mine])\n", ""),
                                  ("    def forward(self, x):", '''        self.fc.bias = nn.Parameter(mlp.fc.bias.detach().clone())

    def forward(self, x):''')), "kept fc's whole bias"),
    "rank 0's columns on every rank": (edit(REF_11, (MINE, "        mine = slice(0, d_ff // world)")),
                                       "rank 1 holds rank 0's part of fc.weight"),
    "f's backward averages": (edit(REF_11, (F_BACKWARD, '''        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()''')), "the mean of the ranks' parts, not their sum"),
    "a typo": (edit(REF_11, (FORWARD, "        return SumOverRanks.apply(F.linear(h, self.proj.weights)) + self.proj.bias")),
               "your script failed on 2 processes: AttributeError"),
}


# ---------------------------------------------------------------------------------------------
# one launch for every script of both catalogues
# ---------------------------------------------------------------------------------------------

CATALOGUE = {**{("10.2", "right", k): v for k, v in DDP_RIGHT.items()},
             **{("10.2", "wrong", k): v[0] for k, v in DDP_WRONG.items()},
             **{("11.1", "right", k): v for k, v in MLP_RIGHT.items()},
             **{("11.1", "wrong", k): v[0] for k, v in MLP_WRONG.items()}}
ARGS = {"10.2": ddp.spec_arguments(ddp.DDPSpec(**checks.scaling_out.DATA_PARALLEL_SPEC)),
        "11.1": [item for key, value in checks.model_parallelism.MLP_ARGS.items()
                 for item in (f"--{key.replace('_', '-')}", str(value))]}


def slug(key: tuple[str, str, str]) -> str:
    return re.sub(r"\W+", "_", "_".join(key)).strip("_")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Script path -> (its --out folder, its first error line or None), all from one torchrun launch."""
    root = tmp_path_factory.mktemp("scripts")
    jobs = []
    for key, source in CATALOGUE.items():
        path = root / f"{slug(key)}.py"
        path.write_text(source)
        jobs.append((path, root / slug(key), ARGS[key[0]]))
    errors = launch.launch_scripts(jobs, root / "launch", nproc=2, timeout_s=600)
    return {str(path): (out, error) for (path, out, _), error in zip(jobs, errors)}


@pytest.fixture
def checked(runs, monkeypatch):
    """Call a check on one of the catalogue's scripts, its launch replaced by that script's run."""
    def run_script(path, exercise, args, *, timeout_s=120.0):
        out, error = runs[str(path)]
        if error and "NotImplementedError" in error:
            raise NotAttempted("stub")
        return out, error

    monkeypatch.setattr(check_scripts, "run_script", run_script)

    def call(exercise: str, kind: str, name: str) -> None:
        check = {"10.2": checks.check_data_parallel, "11.1": checks.check_megatron_mlp}[exercise]
        path = next(p for p in runs if Path(p).stem == slug((exercise, kind, name)))
        check(path)

    return call


SCRIPT_CHECKS = {"10.2": ("check_data_parallel", DDP_RIGHT, DDP_WRONG), "11.1": ("check_megatron_mlp", MLP_RIGHT, MLP_WRONG)}


@pytest.mark.parametrize("exercise, name", [(e, n) for e, (_, right, _) in SCRIPT_CHECKS.items() for n in right])
def test_script_checks_accept_right_scripts(checked, exercise, name, capsys):
    checked(exercise, "right", name)
    assert f"{SCRIPT_CHECKS[exercise][0]} passed" in capsys.readouterr().out


@pytest.mark.parametrize("exercise, name", [(e, n) for e, (_, _, wrong) in SCRIPT_CHECKS.items() for n in wrong])
def test_script_checks_refuse_common_mistakes(checked, exercise, name):
    with pytest.raises(CheckFailed) as info:
        checked(exercise, "wrong", name)
    message = str(info.value)
    assert SCRIPT_CHECKS[exercise][2][name][1] in message and "\n" not in message and len(message) < 400, message


# ---------------------------------------------------------------------------------------------
# before any launch: no file, a stub, a script that is not Python, one that uses the reference
# ---------------------------------------------------------------------------------------------

def stub(source: str, exercise: str, *bodies: str) -> str:
    return edit(source, *((body, f'        raise NotImplementedError("Exercise {exercise} is not done yet")')
                          for body in bodies))


BEFORE_LAUNCH = {
    "10.2 stub": (checks.check_data_parallel, stub(REF_10, "10.2", AVERAGE), NotAttempted, "Exercise 10.2 is not done yet"),
    "10.2 PyTorch's DDP": (checks.check_data_parallel, edit(REF_10, ("import torch\n", "import torch\nfrom torch.nn.parallel "
                           "import DistributedDataParallel as DDP\n"), ("    broadcast_weights(model)\n",
                           "    model = DDP(model)\n")), ReferenceCalled,
                           "`torch.nn.parallel.DistributedDataParallel`"),
    "10.2 the reference's functions": (checks.check_data_parallel, edit(REF_10, ("from course_lib.parts.loop import train\n",
                                       "from course_lib.parts.loop import train\nfrom course_lib.distributed.data_parallel "
                                       "import average_gradients as avg\n")), ReferenceCalled,
                                       "`course_lib.distributed.data_parallel.average_gradients`"),
    "10.2 not Python": (checks.check_data_parallel, REF_10.replace("def shard(", "def shard(:", 1), StudentCodeError,
                        "your script is not valid Python"),
    "11.1 stub": (checks.check_megatron_mlp, stub(REF_11, "11.1", F_FORWARD, G_BACKWARD), NotAttempted,
                  "Exercise 11.1 is not done yet"),
    "11.1 the course's f": (checks.check_megatron_mlp, edit(REF_11, ("        h = F.gelu(self.fc(CopyToRanks.apply(x)))",
                            "        h = F.gelu(self.fc(tensor_parallel.f(x)))")), ReferenceCalled,
                            "`course_lib.distributed.tensor_parallel.f`"),
    "11.1 PyTorch's parallel plans": (checks.check_megatron_mlp, "from torch.distributed.tensor.parallel import "
                                      "ColwiseParallel\n" + REF_11, ReferenceCalled,
                                      "`torch.distributed.tensor.parallel.ColwiseParallel`"),
}


@pytest.mark.parametrize("name", BEFORE_LAUNCH)
def test_refused_before_any_launch(tmp_path, monkeypatch, name):
    check, source, error, sentence = BEFORE_LAUNCH[name]
    monkeypatch.setattr(check_scripts, "run_script", lambda *a, **k: pytest.fail("the check launched the script"))
    path = tmp_path / "script.py"
    path.write_text(source)
    with pytest.raises(error) as info:
        check(str(path))
    assert sentence in str(info.value) and "\n" not in str(info.value)


def test_a_missing_script_is_named(tmp_path):
    with pytest.raises(CheckFailed, match=r"there is no script at .*nowhere\.py: run the exercise's %%writefile cell"):
        checks.check_data_parallel(str(tmp_path / "nowhere.py"))


def test_a_failed_launch_is_one_sentence_and_a_stub_reached_at_run_time_is_not_attempted(tmp_path, monkeypatch):
    def failing(message):
        def launch_script(*args, **kwargs):
            raise launch.ParallelJobFailed(message)
        return launch_script

    path = tmp_path / "script.py"
    path.write_text("print('hello')\n")
    monkeypatch.setattr(launch, "launch_script", failing("the 2-process job 'script.py' failed: [rank1]: NotImplementedError: "
                                                         "Exercise 11.1 is not done yet."))
    with pytest.raises(NotAttempted, match="Exercise 11.1 is not done yet"):
        check_scripts.run_script(path, "11.1", [])
    monkeypatch.setattr(launch, "launch_script", failing("the 2-process job 'script.py' failed: [rank0]: ZeroDivisionError: "
                                                         "division by zero."))
    out, failure = check_scripts.run_script(path, "10.2", [])
    assert failure == "ZeroDivisionError: division by zero (rank 0)"
    with pytest.raises(CheckFailed, match=r"^your script failed on 2 processes: ZeroDivisionError: division by zero "
                                          r"\(rank 0\)\.$"):
        checks.scaling_out.judge_data_parallel(out, failure, ddp.DDPSpec(**checks.scaling_out.DATA_PARALLEL_SPEC))


def test_the_notebooks_solutions_are_the_reference_scripts():
    """The solution edition's %%writefile cells hold the library's reference scripts, word for word."""
    root = Path(__file__).resolve().parent.parent
    for notebook, exercise, reference in (("10_scaling_out", "10.2", REF_10), ("11_model_parallelism", "11.1", REF_11)):
        cells = json.loads((root / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
        source = next("".join(c["source"]) for c in cells
                      if c["cell_type"] == "code" and f"# Exercise {exercise}:" in "".join(c["source"]))
        lines = [line for line in source.splitlines()[2:] if line.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION")]
        body = reference[reference.index('"""\n', 3) + 4:]
        assert "\n".join(lines) + "\n" == body, notebook
