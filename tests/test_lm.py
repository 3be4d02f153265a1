"""course_lib.parts.lm (the loop with a language model's batches): the schedule against torch's schedulers,
batches, accumulation, checkpoints, resume, MFU."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from torch import nn

from course_lib.parts.model import GPT, GPTConfig
from course_lib.parts.lm import TrainConfig, evaluate, get_batch, lr_at, train_lm as train
from course_lib.parts.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from course_lib.parts.loop import History
from course_lib.tools.timing import PEAK_BF16_FLOPS, mfu, peak_flops

CONFIG = GPTConfig(vocab_size=20, context=16, n_layer=2, n_head=2, d_model=32)
TOKENS = torch.randint(0, 20, (4000,), generator=torch.Generator().manual_seed(0))
VAL = torch.randint(0, 20, (800,), generator=torch.Generator().manual_seed(1))
QUICK = dict(steps=12, batch_size=4, warmup_steps=3, log_every=3, eval_every=6, eval_batches=2,
             progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("warmup, total", [(5, 30), (1, 10), (0, 12), (10, 10)])
def test_lr_at_matches_torch_schedulers(warmup, total):
    lr, min_lr = 1e-3, 1e-4
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    schedulers, milestones = [], []
    if warmup > 0:
        schedulers.append(torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, max(warmup - 1, 1)))
        milestones.append(warmup)
    schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total - 1 - warmup, 1), min_lr))
    scheduler = (torch.optim.lr_scheduler.SequentialLR(opt, schedulers, milestones) if milestones
                 else schedulers[0])
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = [lr_at(s, lr=lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr) for s in range(total)]
    if warmup == total:                     # no decay phase at all: warm-up to the end
        expected = [lr * (s + 1) / warmup for s in range(total)]
    assert ours == pytest.approx(expected, abs=1e-12)


def test_lr_at_endpoints_and_errors():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=20, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.25)
    assert lr_at(3, **kw) == lr_at(4, **kw) == 1.0
    assert lr_at(19, **kw) == pytest.approx(0.1) and lr_at(25, **kw) == 0.1
    values = [lr_at(s, **kw) for s in range(4, 20)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        lr_at(0, lr=1.0, warmup_steps=5, total_steps=3)


# ---------------------------------------------------------------------------------------------- batches

def test_get_batch_windows_are_shifted_and_seeded():
    tokens = torch.arange(100)
    x, y = get_batch(tokens, 8, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == torch.long
    assert torch.equal(y, x + 1)                                 # y is x shifted by one token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)                  # contiguous windows
    assert int(y.max()) <= 99 and int(x.min()) >= 0
    x2, _ = get_batch(tokens, 8, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="too few"):
        get_batch(torch.arange(10), 2, 10, torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        get_batch(tokens, 2, 10, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        get_batch(tokens.float(), 2, 10, torch.Generator())


def test_evaluate_uses_the_same_windows_every_time():
    model = fresh_model()
    a = evaluate(model, VAL, batch_size=4, context=16, batches=3)
    b = evaluate(model, VAL, batch_size=4, context=16, batches=3)
    assert a == b and model.training


# ---------------------------------------------------------------------------------------------- the loop

def test_training_learns_a_repeating_pattern():
    pattern = torch.arange(10).repeat(400)                       # 0 1 2 … 9 0 1 2 …: predictable
    model = fresh_model()
    history = train(model, pattern, pattern[:500], steps=40, batch_size=8, lr=1e-2, warmup_steps=5,
                    log_every=10, eval_every=20, eval_batches=2, progress=False)
    assert history.step == [10, 20, 30, 40] and history.eval_step == [20, 40]
    assert history.val_loss[-1] < 0.5 < history.train_loss[0]
    assert history.tokens_seen == 40 * 8 * 16 and all(s > 0 for s in history.tokens_per_s)
    assert history.mfu == [None] * 4                            # no GPU peak to compare with on a CPU
    assert len(history.lr) == 4 and history.lr[-1] == pytest.approx(1e-3)
    assert "val loss" in history.summary()


def test_gradient_accumulation_equals_a_bigger_batch():
    # two draws of 4 windows take the same start positions as one draw of 8
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(torch.cat([get_batch(TOKENS, 4, 16, g1)[0] for _ in range(2)]),
                       get_batch(TOKENS, 8, 16, g2)[0])
    a, b = fresh_model(), fresh_model()
    train(a, TOKENS, **{**QUICK, "batch_size": 8, "grad_accum": 1})
    train(b, TOKENS, **{**QUICK, "batch_size": 4, "grad_accum": 2})
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def test_resume_in_a_new_process_gives_identical_weights(tmp_path):
    straight = fresh_model()
    full = train(straight, TOKENS, VAL, **QUICK)

    # the first half runs in another Python process, which writes the checkpoint and exits
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from course_lib.parts.model import GPT, GPTConfig
        from course_lib.parts.lm import train_lm as train
        tokens = torch.randint(0, 20, (4000,), generator=torch.Generator().manual_seed(0))
        val = torch.randint(0, 20, (800,), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{CONFIG.to_dict()!r}))
        history = train(model, tokens, val, checkpoint_dir={str(tmp_path)!r}, until_step=6, **{QUICK!r})
        assert history.interrupted and history.step[-1] == 6
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / CHECKPOINT_NAME).is_file()

    torch.manual_seed(12345)                                    # a different global RNG state
    resumed_model = fresh_model(seed=7)                         # different initial weights
    resumed = train(resumed_model, TOKENS, VAL, checkpoint_dir=str(tmp_path), resume=True, **QUICK)
    assert same_weights(straight, resumed_model)
    assert resumed.step == full.step and resumed.train_loss == full.train_loss
    assert resumed.val_loss == full.val_loss and not resumed.interrupted


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    class InterruptAt(nn.Module):
        """Wraps a GPT and raises KeyboardInterrupt in the middle of a step (its 2nd micro-batch)."""

        def __init__(self, inner, at_call):
            super().__init__()
            self.inner, self.calls, self.at_call = inner, 0, at_call
            self.config = inner.config

        def forward(self, x, y):
            self.calls += 1
            if self.calls == self.at_call and self.training:
                raise KeyboardInterrupt
            return self.inner(x, y)

    settings = {**QUICK, "grad_accum": 2, "eval_every": 0}
    straight = fresh_model()
    train(straight, TOKENS, **settings)
    wrapped = InterruptAt(fresh_model(), at_call=2 * 5 + 2)       # inside step 6
    history = train(wrapped, TOKENS, checkpoint_dir=str(tmp_path), **settings)
    assert history.interrupted and history.step[-1] == 5
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, InterruptAt(fresh_model(9), -1))["step"] == 5
    wrapped.at_call = -1
    train(wrapped, TOKENS, checkpoint_dir=str(tmp_path), resume=True, **settings)
    assert same_weights(straight, wrapped.inner)


def test_checkpoint_is_plain_safetensors(tmp_path):
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(TOKENS[:16][None], TOKENS[1:17][None])[1].backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.safetensors", model, optimizer, step=7, metadata={"note": "hi"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["step"] == "7"
    assert "model.tok_emb.weight" in keys and "optim.0.exp_avg" in keys and "rng.torch_cpu" in keys
    other = fresh_model(seed=3)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    info = load_checkpoint(path, other, other_opt)
    assert info == {"step": 7, "metadata": {"note": "hi"}}
    assert same_weights(model, other)
    assert other.lm_head.weight is other.tok_emb.weight            # still tied after loading
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], other_opt.state[q]["exp_avg_sq"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", other)


def test_any_module_with_forward_x_y_trains():
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(20, 20)

        def forward(self, x, y):
            logits = self.table(x)
            return logits, nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    torch.manual_seed(0)
    history = train(Bigram(), TOKENS, VAL, context=8, **QUICK)
    assert len(history.val_loss) == 2 and history.mfu[-1] is None
    with pytest.raises(ValueError, match="context"):
        train(Bigram(), TOKENS, **QUICK)


def test_config_errors_and_peak_flops_on_cpu():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp16")
    with pytest.raises(TypeError, match="unknown settings"):
        train(fresh_model(), TOKENS, stepz=3)
    assert peak_flops("cpu") is None
    assert History.from_dict(History(step=[1]).to_dict()).step == [1]


def test_model_without_targets_in_forward_gets_one_sentence():
    class LogitsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(20, 20)

        def forward(self, x):
            return self.table(x)

    with pytest.raises(TypeError) as info:
        train(LogitsOnly(), TOKENS, context=8, **QUICK)
    assert str(info.value).startswith("train_lm() calls model(x, y) with the targets y and needs (logits, loss) "
                                      "back, but LogitsOnly.forward(x) does not take the targets")

    class ReturnsLogits(LogitsOnly):
        def forward(self, x, y=None):
            return self.table(x)

    with pytest.raises(TypeError, match=r"needs model\(x, y\) to return \(logits, loss\).*ReturnsLogits returned "
                                        r"a Tensor"):
        train(ReturnsLogits(), TOKENS, context=8, **QUICK)


def test_short_runs_get_a_default_warmup_that_fits():
    """train(steps=1) used to refuse the default warm-up of 20 steps the caller never set."""
    assert TrainConfig(steps=1).warmup == 0
    assert TrainConfig(steps=50).warmup == 5
    assert TrainConfig(steps=600).warmup == 20 and TrainConfig(steps=600, warmup_steps=7).warmup == 7
    model = fresh_model()
    before = [p.detach().clone() for p in model.parameters()]
    history = train(model, TOKENS, steps=1, batch_size=2, progress=False)
    assert history.step == [1] and history.lr == [pytest.approx(1e-4)]  # no warm-up; the last step is at min_lr
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step changed nothing"
    with pytest.raises(ValueError, match="warmup_steps must be an int in 0..steps=1"):
        TrainConfig(steps=1, warmup_steps=2)


# ---------------------------------------------------------------------------------------------- MFU
NAMES_AND_PEAKS = [  # as torch.cuda.get_device_name() reports them
    ("NVIDIA H100 80GB HBM3", "H100", 989e12),       # SXM
    ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
]


@pytest.mark.parametrize("order", ["as written", "reversed"])
def test_peak_table_lookup_picks_the_most_specific_entry(monkeypatch, order):
    """H100 NVL and PCIe are not the SXM board; the lookup does not depend on the table's order."""
    from course_lib.tools import timing as train_module

    if order == "reversed":
        monkeypatch.setattr(train_module, "PEAK_BF16_FLOPS", dict(reversed(PEAK_BF16_FLOPS.items())))
    for name, key, peak in NAMES_AND_PEAKS:
        assert train_module.peak_for_name(name) == (key, peak), name
    assert train_module.peak_for_name("NVIDIA GeForce RTX 4090") is None


def fake_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_mfu_uses_the_boards_own_peak_and_names_it(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 NVL")
    result = mfu(10_000, 6e9, "cuda")
    assert result.value == pytest.approx(10_000 * 6e9 / 835e12) and result.peak_flops == 835e12
    assert "835 TFLOP/s" in str(result) and "PEAK_BF16_FLOPS['H100 NVL']" in str(result)
    assert mfu(10_000, 6e9, "cuda", amp="auto").value == result.value  # auto = bf16 autocast on CUDA
    fake_gpu(monkeypatch, "NVIDIA H200")
    assert mfu(10_000, 6e9, "cuda").value == pytest.approx(10_000 * 6e9 / 989e12)


def test_mfu_is_none_with_a_reason_where_no_bf16_peak_applies(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    fp32 = mfu(10_000, 6e9, "cuda", amp="none")
    assert fp32.value is None and "fp32 (amp='none')" in fp32.reason and str(fp32).startswith("not defined: ")
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")
    assert "RTX 4090 is not in course_lib.tools.timing.PEAK_BF16_FLOPS" in mfu(10_000, 6e9, "cuda").reason
    cpu = mfu(10_000, 6e9, "cpu")
    assert cpu.value is None and "cpu device" in cpu.reason
    with pytest.raises(ValueError, match="amp must be 'auto', 'bf16' or 'none'"):
        mfu(1, 1, "cpu", amp="fp16")


def test_train_scores_mfu_with_its_own_amp_setting(monkeypatch):
    from course_lib.parts import loop as train_module

    seen = []
    real = train_module.mfu

    def spy(*args, **kwargs):
        seen.append(kwargs["amp"])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "mfu", spy)
    history = train(fresh_model(), TOKENS, **{**QUICK, "amp": "none"})
    assert seen and set(seen) == {"none"} and history.mfu == [None] * len(history.step)
