"""course_lib.experiments.bench in its reduced CPU form: the schema of the result, the pieces it swaps in
(explicit attention, fused AdamW), LoRA against peft from the same start, and the refusal to write a
reduced run over the GPU record."""

from __future__ import annotations

import json

import pytest
import torch

from course_lib.tools import assets
from course_lib.experiments import bench
from course_lib.parts import loop
from course_lib.parts.lm import train_lm
from course_lib.parts.loop import make_optimizer
from course_lib.parts.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def result():
    return bench.run("all", device="cpu", quick=True, argv=["all", "--quick"])


def test_explicit_attention_computes_what_sdpa_computes():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context=16, n_layer=2, n_head=4, d_model=32)
    model = GPT(config)
    idx = torch.randint(50, (3, 16))
    flash_logits, flash_loss = model(idx, idx)
    bench.use_explicit_attention(model)
    assert all(type(b.attn) is bench.ExplicitAttention for b in model.blocks)
    explicit_logits, explicit_loss = model(idx, idx)
    torch.testing.assert_close(explicit_logits, flash_logits, atol=1e-5, rtol=1e-5)
    # the gradients agree too (the benchmark trains with it)
    explicit_loss.backward()
    g_explicit = model.tok_emb.weight.grad.clone()
    model.zero_grad()
    for b in model.blocks:
        b.attn.__class__ = bench.CausalSelfAttention
    model(idx, idx)[1].backward()
    torch.testing.assert_close(g_explicit, model.tok_emb.weight.grad, atol=1e-6, rtol=1e-5)


def test_the_fused_flag_reaches_adamw():
    """The bench's "+ fused AdamW" row is a setting of the loop (LoopConfig.fused), passed to make_optimizer."""
    model = torch.nn.Linear(4, 4)
    assert make_optimizer(model, 1e-3, fused=True).defaults["fused"] is True
    assert not make_optimizer(model, 1e-3, fused=False).defaults["fused"]
    seen = []
    real = loop.make_optimizer
    loop_settings = dict(steps=1, batch_size=2, context=4, progress=False, eval_every=0)
    try:
        loop.make_optimizer = lambda *a, **k: seen.append(a[-1]) or real(*a, **k)
        train_lm(GPT(GPTConfig(vocab_size=8, context=4, n_layer=1, n_head=1, d_model=8)),
                 torch.arange(40) % 8, fused=False, **loop_settings)
    finally:
        loop.make_optimizer = real
    assert seen == [False]


def test_result_schema(result):
    assert result["device"] == "cpu" and result["reduced"] is True
    assert result["torch"] == torch.__version__
    assert result["tiny_gpt"]["tokens_per_s"] > 0 and result["tiny_gpt"]["mfu"] is None
    lora = result["lora"]
    assert lora["vs_peft_step_time_ratio"] > 0
    assert lora["peak_mem_gb"] is None and lora["peft_peak_mem_gb"] is None  # measured on CUDA only
    provenance = result["provenance"]
    assert provenance["command"] == "python -m course_lib.experiments.bench all --quick"
    assert {"date", "versions", "hardware", "commit", "deterministic_algorithms"} <= set(provenance)
    assert provenance["versions"]["peft"] and provenance["hardware"]["cpu_count"] >= 1
    json.dumps(result)  # serialisable as it is


def test_train_ablation_adds_one_optimisation_per_row(result):
    rows = result["train_ablation"]
    flags = [(r["fused_adamw"], r["flash_attention"], r["batch_size"]) for r in rows]
    assert flags == [(False, False, 4), (True, False, 4), (True, True, 4), (True, True, 4), (True, True, 16)]
    assert all(r["torch_compile"] is False for r in rows)  # CPU: no compile
    measured = [rows[i] for i in (0, 1, 2, 4)]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None and not r.get("skipped") for r in measured)
    assert all("speedup_vs_previous" in r for r in rows[1:3])
    # same seed, same data: every variant computes the same training (up to float rounding)
    losses = [r["final_train_loss"] for r in rows[:3]]
    assert max(losses) - min(losses) < 1e-4


def test_a_skipped_row_says_so_and_reports_no_numbers(result):
    """The torch.compile row is not run on a CPU: it must not show a throughput of its own (it would be
    the row above's, measured again), and the row after it compares with the last measured row."""
    rows = result["train_ablation"]
    skipped = rows[3]
    assert skipped["variant"] == "+ torch.compile" and skipped["skipped"] is True
    assert skipped["note"].startswith("skipped")
    for key in ("tokens_per_s", "step_ms", "mfu", "peak_mem_gb"):
        assert skipped[key] is None
    assert "final_train_loss" not in skipped and "speedup_vs_previous" not in skipped
    after = rows[4]
    assert "without torch.compile" in after["note"] and not after["note"].startswith("skipped")
    assert after["speedup_vs"] == rows[2]["variant"]
    assert after["speedup_vs_previous"] == pytest.approx(after["tokens_per_s"] / rows[2]["tokens_per_s"])
    assert result["tiny_gpt"]["variant"] != skipped["variant"]  # the best row is a measured one


def test_lora_course_and_peft_train_identically_from_the_same_start(result):
    rows = result["lora"]["rows"]
    assert rows["course_lora"]["trainable_params"] == rows["peft"]["trainable_params"]
    # tiny Llama: 2 layers x (q: r*(64+64), v: r*(64+32)) with r = 8
    assert rows["course_lora"]["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert result["lora"]["loss_max_abs_diff_vs_peft"] < 1e-5
    assert rows["course_lora"]["losses"][-1] != rows["course_lora"]["losses"][0]  # it did train
    full = rows["full_finetune"]
    assert full["trainable_params"] > 10 * rows["peft"]["trainable_params"]
    assert full["weights_grads_adam_gb"] > rows["peft"]["weights_grads_adam_gb"]


def test_main_writes_where_told_and_never_over_the_gpu_record(tmp_path, monkeypatch, capsys):
    assert bench.main(["train", "--quick", "--out", str(bench.DEFAULT_OUT)]) == 2
    assert "does not go into data/results/gpu_benchmarks.json" in capsys.readouterr().err
    # a run writes JSON; a later run of the other section on the same device keeps the first one
    calls = []

    def fake_run(what, **kwargs):
        calls.append(what)
        section = {"tiny_gpt": {"tokens_per_s": 1.0, "mfu": None}} if what == "train" else \
            {"lora": {"vs_peft_step_time_ratio": 1.0, "peak_mem_gb": None, "peft_peak_mem_gb": None}}
        return dict(device="cpu", device_name="cpu", torch=torch.__version__, reduced=True, **section,
                    provenance={"command": what})

    monkeypatch.setattr(bench, "run", fake_run)
    out = tmp_path / "bench.json"
    assert bench.main(["train", "--out", str(out)]) == 0
    assert bench.main(["lora", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert calls == ["train", "lora"] and {"tiny_gpt", "lora"} <= set(written)
    assert written["provenance"] == {"command": "lora"}


def test_bad_input():
    with pytest.raises(ValueError, match="what must be 'train', 'lora' or 'all'"):
        bench.run("everything", device="cpu")
    with pytest.raises(ValueError, match="unknown LoRA bench model"):
        bench._llama("gpt-5")


def test_smollm2_shape_matches_the_asset():
    if not assets.is_cached("smollm2-135m-instruct", verify=False):
        pytest.skip("the smollm2-135m-instruct asset is not cached")
    import gguf

    reader = gguf.GGUFReader(str(assets.fetch("smollm2-135m-instruct") / bench.SMOLLM2_GGUF))
    field = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    shape = bench.SMOLLM2_SHAPE
    assert (field["llama.embedding_length"], field["llama.feed_forward_length"], field["llama.block_count"],
            field["llama.attention.head_count"], field["llama.attention.head_count_kv"],
            field["llama.vocab_size"]) == (shape["hidden_size"], shape["intermediate_size"],
                                            shape["num_hidden_layers"], shape["num_attention_heads"],
                                            shape["num_key_value_heads"], shape["vocab_size"])


def test_benchmarks_time_without_deterministic_algorithms_and_say_so(monkeypatch):
    """start() turns deterministic algorithms on; the benchmark times with them off, records that in
    its provenance, and restores the caller's setting."""
    seen = []

    def stub(device, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return {"tiny_gpt": {"tokens_per_s": 1.0, "mfu": None}}

    monkeypatch.setattr(bench, "bench_train", stub)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        result = bench.run("train", device="cpu", quick=True, progress=False)
        assert seen == [False] and result["provenance"]["deterministic_algorithms"] is False
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_the_speed_anchor_is_the_course_gpt_computed_plainly():
    """The anchor of ``experiments.speed`` computes the course's GPT (same weights, same loss and gradients),
    so the step-time ratio compares two ways of writing one model, not two models."""
    from course_lib.experiments import speed

    config = GPTConfig(vocab_size=30, context=16, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    ours = GPT(config)
    anchor = speed.AnchorGPT(config)
    anchor.load_state_dict(ours.state_dict())
    idx = torch.randint(30, (3, 16))
    loss_ours, loss_anchor = ours(idx, idx)[1], anchor(idx, idx)[1]
    torch.testing.assert_close(loss_ours, loss_anchor, atol=1e-6, rtol=1e-6)
    loss_ours.backward(), loss_anchor.backward()
    torch.testing.assert_close(ours.tok_emb.weight.grad, anchor.tok_emb.weight.grad, atol=1e-6, rtol=1e-5)
    result = speed.model_vs_anchor(steps=2, windows=1)
    assert result["ratio"] > 0 and result["parameters"]["course"] == result["parameters"]["anchor"]
    loop = speed.loop_vs_bare(steps=2, windows=1)
    assert loop["ratio"] > 0 and loop["loop_ms"] > 0
