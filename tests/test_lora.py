"""course_lib.parts.lora against an independent implementation: peft 0.21 (LoraConfig + get_peft_model).

Models are small BERT / Llama configurations built in code, so no weights are needed.
"""

from __future__ import annotations

import copy
import math

import peft  # the independent reference; pinned, so a missing one fails instead of skipping
import pytest
import torch
import transformers
from torch import nn

from course_lib.parts import lora
from course_lib.parts.lora import LoRALinear, apply_lora, count_trainable
from course_lib.parts.loop import optimizer_state_bytes

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_bert(seed: int = 0, classifier: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    return cls(config).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def ids(seed: int = 1, batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def out(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    result = model(input_ids=input_ids)
    return result.logits if hasattr(result, "logits") and result.logits is not None else result.last_hidden_state


def randomise_lora(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def peft_twin(base: nn.Module, mine: nn.Module, r: int, alpha: float, targets: list[str], **extra) -> nn.Module:
    """peft's LoRA on a copy of ``base`` with the same A and B as ``mine``."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **extra)
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, layer in lora.lora_layers(mine).items():
            theirs = modules[f"base_model.model.{name}"]
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return twin


# ---- LoRALinear ------------------------------------------------------------------------------

def test_lora_linear_shapes_init_and_frozen_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (48, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) with fan_in = in_features, as nn.Linear and peft
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_lora_linear_starts_at_base_and_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = LoRALinear(base, r=3, alpha=6)
    x = torch.randn(2, 5, 10)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + (6 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_dropout_acts_on_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = LoRALinear(base, r=2, alpha=2, dropout=0.9).train()
    x = torch.randn(4, 10)
    assert torch.equal(layer(x), base(x))  # B = 0: whatever dropout does, the base path is untouched
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight().T)


def test_merge_unmerge_exact_arithmetic_and_idempotent():
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    layer = LoRALinear(base, r=2, alpha=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 12)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, w0 + 2.5 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(base(x), before)  # after merge the base alone computes the adapted layer
    layer.merge()  # twice is a no-op
    torch.testing.assert_close(base.weight, w0 + 2.5 * layer.lora_B @ layer.lora_A)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)


def test_bad_arguments_get_one_sentence():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)
    with pytest.raises(ValueError, match="positive integer"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=-1)
    with pytest.raises(ValueError, match="larger than the layer"):
        LoRALinear(nn.Linear(4, 4), r=5, alpha=1)


# ---- injection, against peft -------------------------------------------------------------------

def test_starting_output_equals_base_model():
    base = tiny_bert()
    mine = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8)
    x = ids()
    assert torch.equal(out(mine, x), out(base, x))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_outputs_and_gradients_equal_peft_given_same_A_B(which):
    base, targets, r, alpha = ((tiny_bert(), ["query", "value"], 4, 8) if which == "bert"
                               else (tiny_llama(), LLAMA_TARGETS, 2, 16))
    mine = apply_lora(copy.deepcopy(base), targets, r=r, alpha=alpha)
    randomise_lora(mine)
    twin = peft_twin(base, mine, r, alpha, targets)
    x = ids()
    y_mine, y_peft = out(mine, x), out(twin, x)
    assert not torch.allclose(y_mine, out(base, x), atol=1e-4)  # the adapters really do something
    torch.testing.assert_close(y_mine, y_peft, atol=1e-5, rtol=1e-5)
    y_mine.square().mean().backward()
    y_peft.square().mean().backward()
    theirs = dict(twin.named_modules())
    for name, layer in lora.lora_layers(mine).items():
        t = theirs[f"base_model.model.{name}"]
        torch.testing.assert_close(layer.lora_A.grad, t.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, t.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("which,targets,r", [("bert", ["query", "value"], 4), ("bert", ["query", "key", "value", "dense"], 2),
                                             ("llama", LLAMA_TARGETS, 8)])
def test_trainable_counts_match_peft(which, targets, r):
    base = tiny_bert() if which == "bert" else tiny_llama()
    mine = apply_lora(copy.deepcopy(base), targets, r=r, alpha=2 * r)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    trainable, _ = twin.get_nb_trainable_parameters()
    assert count_trainable(mine) == trainable
    expected = sum(r * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets)
    assert count_trainable(mine) == expected


def test_trainable_extra_matches_peft_modules_to_save():
    base = tiny_bert(classifier=True)
    mine = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=4, trainable_extra=["classifier"])
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert count_trainable(mine) == twin.get_nb_trainable_parameters()[0]
    assert {"classifier.weight", "classifier.bias"} <= set(lora.trainable_parameters(mine))


def test_suffix_matching_and_errors():
    model = nn.Module()
    model.block = nn.Module()
    model.block.query = nn.Linear(4, 4)
    model.block.query_proj = nn.Linear(4, 4)
    model.block.deep = nn.Sequential(nn.Module())
    model.block.deep[0].query = nn.Linear(4, 4)
    apply_lora(model, ["query"], r=1, alpha=1)
    assert isinstance(model.block.query, LoRALinear) and isinstance(model.block.deep[0].query, LoRALinear)
    assert type(model.block.query_proj) is nn.Linear
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["query"], r=1, alpha=1)
    with pytest.raises(ValueError, match=r"no nn.Linear of the model matches .*'query', 'key', 'value'"):
        apply_lora(tiny_bert(), ["q_proj"], r=1, alpha=1)
    with pytest.raises(TypeError, match=r"write target_modules=\['query'\]"):
        apply_lora(tiny_bert(), "query", r=1, alpha=1)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_lora(tiny_bert(), ["attention"], r=1, alpha=1)
    with pytest.raises(ValueError, match="trainable_extra names 'head'"):
        apply_lora(tiny_bert(), ["query"], r=1, alpha=1, trainable_extra=["head"])


# ---- training, merging, saving --------------------------------------------------------------------

def train_a_few_steps(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(seed=7)
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_after_training_merged_equals_unmerged_and_merge_lora_gives_plain_model():
    base = tiny_llama()
    model = apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=4, alpha=8)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_a_few_steps(model)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"{n} changed although frozen"
    x = ids()
    unmerged = out(model, x)
    assert not torch.allclose(unmerged, out(base, x), atol=1e-4)
    for layer in lora.lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(out(model, x), unmerged, atol=1e-5, rtol=1e-5)
    for layer in lora.lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(out(model, x), unmerged, atol=1e-5, rtol=1e-5)
    plain = lora.merge_lora(model)
    assert not lora.lora_layers(plain)
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(out(plain, x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_lora_equals_peft_merge_and_unload():
    base = tiny_bert()
    mine = apply_lora(copy.deepcopy(base), ["query", "value"], r=2, alpha=3)
    randomise_lora(mine)
    twin = peft_twin(base, mine, 2, 3, ["query", "value"])
    merged_peft = twin.merge_and_unload()
    merged_mine = lora.merge_lora(mine)
    theirs = merged_peft.state_dict()
    for key, value in merged_mine.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=1e-6)


def test_adapter_save_load_round_trip(tmp_path):
    from safetensors import safe_open

    base = tiny_bert(classifier=True)
    model = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8, trainable_extra=["classifier"])
    randomise_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    path = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {n for n in lora.trainable_parameters(model)}
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("classifier.") for k in keys)
    fresh = lora.load_adapter(copy.deepcopy(base), path)  # a model without LoRA gets the layers added
    x = ids()
    torch.testing.assert_close(out(fresh, x), out(model, x), atol=0, rtol=0)
    assert count_trainable(fresh) == count_trainable(model)
    again = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8, trainable_extra=["classifier"])
    lora.load_adapter(again, path)  # or one that already has matching LoRA layers
    torch.testing.assert_close(out(again, x), out(model, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="rank 2 but the adapter was saved with rank 4"):
        lora.load_adapter(apply_lora(copy.deepcopy(base), ["query", "value"], r=2, alpha=8), path)
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        lora.load_adapter(base, tmp_path / "missing.safetensors")


def test_bitfit_and_optimizer_state_bytes():
    model = lora.apply_bitfit(tiny_bert(classifier=True), trainable_extra=["classifier"])
    names = set(lora.trainable_parameters(model))
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert count_trainable(model) == n_bias + model.classifier.weight.numel()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert optimizer_state_bytes(opt) == 0
    model(input_ids=ids(), labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    # Adam keeps exp_avg and exp_avg_sq (float32) per parameter, plus a scalar step per tensor
    n_tensors = len(names)
    assert optimizer_state_bytes(opt) == 2 * 4 * count_trainable(model) + n_tensors * 4


def test_input_of_the_wrong_width_gets_one_sentence():
    layer = LoRALinear(nn.Linear(4, 8), r=2, alpha=2)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(3, 5))
    assert str(info.value).startswith("this LoRA layer takes inputs whose last dimension is in_features=4, but x "
                                      "has shape (3, 5)")
    assert layer(torch.randn(2, 3, 4)).shape == (2, 3, 8)  # extra batch dimensions are fine


def test_an_adapter_is_not_loaded_into_a_merged_layer(tmp_path):
    """Its update already lives in the weight: loading new A and B there would apply two updates at once."""
    base = tiny_bert(classifier=True)
    model = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8)
    randomise_lora(model)
    path = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    merged = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=8)
    next(iter(lora.lora_layers(merged).values())).merge()
    with pytest.raises(ValueError, match=r"layer '.*query' is merged: call unmerge\(\) on it before loading an adapter"):
        lora.load_adapter(merged, path)


def test_a_target_matches_whole_name_parts_only():
    """peft's rule: 'query' matches 'query' and 'block.query', not 'subquery' (a suffix of the name, not a part)."""
    model = nn.Module()
    model.query, model.subquery, model.block = nn.Linear(4, 4), nn.Linear(4, 4), nn.Module()
    model.block.query = nn.Linear(4, 4)
    apply_lora(model, ["query"], r=2, alpha=2)
    assert set(lora.lora_layers(model)) == {"query", "block.query"}


# ---- a LoRA layer of the student's own (exercise 07.3) inside the library's machinery ----------

class StudentLayer(nn.Module):
    """The layer a student writes in exercise 07.3: no dropout, no dtype handling, its own arithmetic."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.merged = False

    def forward(self, x):
        h = self.base(x)
        return h if self.merged else h + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.scaling * self.lora_B @ self.lora_A
            self.merged = True


def test_apply_lora_builds_any_layer_class_and_the_adapter_comes_back_as_the_courses(tmp_path):
    base = tiny_bert(classifier=True)
    theirs = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=6, trainable_extra=["classifier"],
                        layer=StudentLayer)
    ours = apply_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=6, trainable_extra=["classifier"])
    assert all(type(m) is StudentLayer for m in lora.lora_layers(theirs).values())
    assert set(lora.lora_layers(theirs)) == set(lora.lora_layers(ours)) and count_trainable(theirs) == count_trainable(ours)
    randomise_lora(theirs)
    randomise_lora(ours)
    x = ids()
    torch.testing.assert_close(out(theirs, x), out(ours, x), atol=1e-5, rtol=1e-5)
    for name, layer in lora.lora_layers(theirs).items():
        assert lora.scaling_of(layer) == 1.5
        torch.testing.assert_close(lora.low_rank_update(layer), lora.lora_layers(ours)[name].delta_weight())
    # saved from the student's layers, loaded as the course's: the same model
    fresh = lora.load_adapter(copy.deepcopy(base), lora.save_adapter(theirs, tmp_path / "a.safetensors"))
    assert all(isinstance(m, LoRALinear) and m.alpha == 6 for m in lora.lora_layers(fresh).values())
    torch.testing.assert_close(out(fresh, x), out(theirs, x), atol=1e-5, rtol=1e-5)
    plain = lora.merge_lora(theirs)
    assert not lora.lora_layers(plain)
    torch.testing.assert_close(out(plain, x), out(fresh, x), atol=1e-5, rtol=1e-5)


def test_a_layer_of_ones_own_gets_one_sentence_where_it_falls_short(tmp_path):
    with pytest.raises(ValueError, match="dropout=0.1 belongs to the course's LoRALinear"):
        apply_lora(tiny_bert(), ["query"], r=2, alpha=4, dropout=0.1, layer=StudentLayer)
    with pytest.raises(TypeError, match="without nn.Parameter attributes lora_A and lora_B"):
        apply_lora(tiny_bert(), ["query"], r=2, alpha=4, layer=lambda base, r, alpha: nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(apply_lora(tiny_bert(), ["query"], r=2, alpha=4, layer=StudentLayer), ["value"], r=2, alpha=4)

    class NoScale(StudentLayer):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            del self.scaling

    model = apply_lora(tiny_bert(), ["query"], r=2, alpha=4, layer=NoScale)
    with pytest.raises(ValueError, match="says neither its scaling nor its alpha"):
        lora.save_adapter(model, tmp_path / "a.safetensors")
    del next(iter(lora.lora_layers(model).values())).base
    with pytest.raises(ValueError, match="no merge\\(\\) or no wrapped nn.Linear called base"):
        lora.merge_lora(model)
    with pytest.raises(TypeError, match="takes a LoRA layer"):
        lora.low_rank_update(nn.Linear(2, 2))
    assert not lora.lora_layers(peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"])))
