"""Checks of notebooks/09_lora_causal_lm_gpu.ipynb (exercises 09.*), with their hints."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from course_lib.checks.framework import exercise, call_student, fail, passed, register_hint

# ----------------------------------------------------------------------------------------------
# 09_lora_causal_lm_gpu: the chat template by hand, the prompt masked out of the loss, LoRA's
# trainable parameters under grouped-query attention
# ----------------------------------------------------------------------------------------------

register_hint("09.1",
              "Every message becomes one block: a start marker with the role, a newline, the content, an end "
              "marker, a newline. Read the template printed above the exercise, and look at what it does when "
              "the first message is not a system message.",
              "Loop over the messages and join the blocks; before the first block, if messages[0]['role'] is "
              "not 'system', put SmolLM2's default system block; after the last, if add_generation_prompt, "
              "open the assistant's turn without closing it.",
              "text += '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'  (and at the end: "
              "text += '<|im_start|>assistant\\n')")
register_hint("09.2",
              "The model should learn only the answer, so only the answer's positions carry a target; every "
              "other position gets the label the loss ignores (-100). transformers shifts the labels by one "
              "itself.",
              "Take the prompt ids (chat template with add_generation_prompt=True) and the answer ids (the JSON "
              "plus '<|im_end|>', no special tokens added); input_ids is their concatenation; labels is -100 "
              "once per prompt id followed by the answer ids, unshifted.",
              "return prompt + reply, [-100] * len(prompt) + reply")
register_hint("09.3",
              "LoRA adds A (r × d_in) and B (d_out × r) to each wrapped linear layer: r·(d_in + d_out) "
              "parameters. What differs between the seven projections is d_in and d_out.",
              "With grouped-query attention, k_proj and v_proj map hidden_size to num_key_value_heads × head_dim "
              "(head_dim = hidden_size / num_attention_heads), not to hidden_size; the MLP's projections use "
              "intermediate_size. Sum r·(d_in + d_out) over the targets, then multiply by the number of layers.",
              "shapes = {'q_proj': (h, h), 'k_proj': (h, kv), 'v_proj': (h, kv), 'o_proj': (h, h), 'gate_proj': "
              "(h, m), 'up_proj': (h, m), 'down_proj': (m, h)}; return L * sum(r * (i + o) for i, o in "
              "(shapes[t] for t in targets))")

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _chat_cases() -> dict[str, tuple[list[dict[str, str]], bool]]:
    from course_lib.parts.causal_lm import chat

    return {
        "one snippet with the course's system message": (chat("A gorgeous, moving film."), True),
        "a two-shot chat": (chat("Dull.", shots=[("Loved it.", 1), ("Awful.", 0)]), True),
        "a chat without a system message": ([{"role": "user", "content": "hi"}], True),
        "a chat whose system message comes second": (
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "S"},
             {"role": "user", "content": "again"}], True),
        "a finished chat (no generation prompt)": (
            [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": '{"sentiment": "positive"}'}], False),
        "content with newlines and braces": ([{"role": "user", "content": 'a\n{"b": 1}\n'}], True),
    }


@exercise("09.1", points=1, fixtures=("tokenizer",), forbid=(
    "transformers.tokenization_utils_base:PreTrainedTokenizerBase.apply_chat_template",
    "transformers.utils.chat_template_utils:render_jinja_template",
    "transformers.utils.chat_template_utils:_compile_jinja_template",
    "transformers.utils.chat_template_utils:_cached_compile_jinja_template",
))
def check_render_chat(fn: Callable[..., str], tokenizer: Any) -> None:
    """Exercise 09.1: ``fn(messages, add_generation_prompt=True)`` returns the text SmolLM2's chat template
    makes (``tokenizer.apply_chat_template(messages, tokenize=False, ...)``)."""
    __tracebackhide__ = True
    for case, (messages, generation) in _chat_cases().items():
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        frozen = [dict(m) for m in messages]
        result = call_student(fn, messages, add_generation_prompt=generation, case=case)
        if messages != frozen:
            fail(f"your render_chat changed the messages it was given on {case}; build a new string instead.")
        if not isinstance(result, str):
            fail(f"your render_chat returns a {type(result).__name__} on {case}; it should return the text (a str).")
        if result == expected:
            continue
        if DEFAULT_SYSTEM in expected and DEFAULT_SYSTEM not in result:
            if any(m["role"] == "system" for m in messages):
                fail(f"on {case} the template adds SmolLM2's default system message, because the *first* message "
                     f"is not a system message: a system message later in the chat does not count.")
            fail(f"on {case} the template first adds SmolLM2's default system message (the chat does not start "
                 f"with one): '<|im_start|>system\\n{DEFAULT_SYSTEM}<|im_end|>\\n'.")
        if DEFAULT_SYSTEM in result and DEFAULT_SYSTEM not in expected:
            fail(f"on {case} you added the default system message although the chat starts with its own; "
                 f"add it only when messages[0]['role'] is not 'system'.")
        if result.replace("<|im_end|>\n", "<|im_end|>") == expected.replace("<|im_end|>\n", "<|im_end|>"):
            fail(f"on {case} every '<|im_end|>' is followed by a newline in SmolLM2's template.")
        if "".join(result.split()) == "".join(expected.split()):
            fail(f"on {case} your newlines differ from the template's: the role is followed by '\\n', and so "
                 f"is every '<|im_end|>'.")
        if expected.endswith("<|im_start|>assistant\n") and not result.endswith("<|im_start|>assistant\n"):
            fail(f"on {case} the text must end by opening the assistant's turn ('<|im_start|>assistant\\n') "
                 f"when add_generation_prompt is True: that is where the model's reply begins.")
        if not expected.endswith("<|im_start|>assistant\n") and result.endswith("<|im_start|>assistant\n"):
            fail(f"on {case} add_generation_prompt is False, so the text ends after the last message's "
                 f"'<|im_end|>\\n', without opening another assistant turn.")
        diverge = next((i for i, (a, b) in enumerate(zip(result, expected)) if a != b), min(len(result), len(expected)))
        fail(f"your text differs from the chat template's on {case} from character {diverge} on: you have "
             f"{result[diverge:diverge + 25]!r}, the template has {expected[diverge:diverge + 25]!r}.")
    passed("check_render_chat", f"your text equals SmolLM2's chat template on {len(_chat_cases())} chats, "
                                f"default system message and generation prompt included.")


def _as_id_list(value: Any, what: str, case: str) -> list[int]:
    """A list of ints from a list, tuple, tensor or NumPy array of token ids (NumPy integers welcome)."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != 1:
            fail(f"{what} has shape {shape} on {case}; return one flat sequence per example.")
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        fail(f"{what} should be a list of ints (token ids) on {case}.")
    return [int(v) for v in value]


@exercise("09.2", points=2, fixtures=("tokenizer",), forbid=(
    "course_lib.parts.causal_lm:encode",
    "course_lib.parts.causal_lm:prompt_ids",
    "course_lib.parts.causal_lm:answer_ids",
    "course_lib.parts.causal_lm:collate",
))
def check_prompt_masking(fn: Callable[..., tuple[Sequence[int], Sequence[int]]], tokenizer: Any) -> None:
    """Exercise 09.2: ``fn(tokenizer, text, label)`` returns ``(input_ids, labels)``: the prompt (with the
    generation header) and the answer, and labels that are -100 on the prompt and the answer's ids on it."""
    __tracebackhide__ = True
    from course_lib.parts.causal_lm import IGNORE, answer_ids, encode, prompt_ids

    cases = {"a positive snippet": ("A gorgeous, moving film.", 1),
             "a negative snippet": ("It's a road trip drama with too many wrong turns.", 0),
             "a snippet with quotes and accents": ('"Amélie" is a delight, "mais non" says my aunt.', 1)}
    for case, (text, label) in cases.items():
        result = call_student(fn, tokenizer, text, label, case=case)
        if not isinstance(result, tuple) or len(result) != 2:
            fail(f"your encode should return a pair (input_ids, labels) on {case}.")
        ids, labels = (_as_id_list(v, w, case) for v, w in zip(result, ("input_ids", "labels")))
        expected_ids, expected_labels = encode(tokenizer, text, label)
        prompt, reply = prompt_ids(tokenizer, text), answer_ids(tokenizer, label)
        # The template of the whole chat (answer as the assistant's message) ends with '<|im_end|>\n': that
        # newline after the answer is as right as its absence, scored or masked.
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if ids == expected_ids + newline:
            expected_ids = ids
            scored, masked = expected_labels + newline, expected_labels + [IGNORE] * len(newline)
            expected_labels = masked if labels == masked else scored
        if len(ids) != len(labels):
            fail(f"input_ids and labels have different lengths ({len(ids)} and {len(labels)}) on {case}: the "
                 f"labels have one entry per input position.")
        if ids != expected_ids:
            if ids == prompt:
                fail(f"input_ids is only the prompt on {case}: append the answer's ids.")
            if ids[: len(prompt)] != prompt:
                fail(f"input_ids does not start with the prompt on {case}: use the chat template with "
                     f"add_generation_prompt=True, so the prompt ends with '<|im_start|>assistant\\n'.")
            if ids[len(prompt):] == reply[:-1]:
                fail(f"the answer in input_ids lacks '<|im_end|>' on {case}: without it the model never "
                     f"learns to stop.")
            fail(f"input_ids differs from prompt + answer on {case}: the answer is the JSON followed by "
                 f"'<|im_end|>', tokenised without special tokens.")
        if labels == expected_labels:
            continue
        if labels == ids:
            fail(f"your labels are the input ids on {case}: the loss would then also train the model to "
                 f"write the prompt; set every prompt position to -100.")
        if labels == expected_labels[1:] + [IGNORE]:
            fail(f"your labels are shifted by one on {case}: transformers shifts them itself (position t is "
                 f"scored on label t + 1), so give labels aligned with input_ids.")
        if labels == [0] * len(prompt) + reply:
            fail(f"you masked the prompt with 0 on {case}; 0 is a real token id. Use -100, the index the "
                 f"cross-entropy ignores.")
        if labels == prompt + [IGNORE] * len(reply):
            fail(f"you masked the answer and kept the prompt on {case}: it is the other way round.")
        masked = sum(1 for v in labels if v == IGNORE)
        if labels[masked:] == expected_labels[masked:] and masked != len(prompt):
            fail(f"you masked {masked} positions on {case}, but the prompt has {len(prompt)} tokens: mask "
                 f"exactly the prompt (the assistant header included), not the answer's first token.")
        fail(f"your labels differ from -100 on the prompt followed by the answer's ids on {case}.")
    passed("check_prompt_masking", f"input_ids and labels match on {len(cases)} snippets: only the answer "
                                   f"(and its <|im_end|>) is scored.")


def _llama_configs() -> dict[str, Any]:
    from transformers import LlamaConfig

    small = dict(vocab_size=128, max_position_embeddings=64)
    return {
        "a model with 4 query heads sharing 2 key/value heads": LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **small),
        "a model with one key/value head (multi-query attention)": LlamaConfig(
            hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=1, **small),
        "a model without grouping (as many key/value heads as query heads)": LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, **small),
    }


def _reference_count(config: Any, r: int, targets: Sequence[str]) -> int:
    """Built, not computed: wrap a real (tiny, random) Llama with the course's LoRA and count."""
    from transformers import LlamaForCausalLM

    from course_lib.parts import lora

    torch.manual_seed(0)
    model = lora.apply_lora(LlamaForCausalLM(config), list(targets), r=r, alpha=2 * r)
    return lora.count_trainable(model)


@exercise("09.3", points=1, forbid=(
    "course_lib.parts.lora:apply_lora",
    "course_lib.parts.lora:count_trainable",
    "course_lib.parts.lora:trainable_parameters",
    "course_lib.parts.lora:LoRALinear",
))
def check_lora_param_count(fn: Callable[[Any, int, Sequence[str]], int]) -> None:
    """Exercise 09.3: ``fn(config, r, targets)`` returns LoRA's trainable parameters on a Llama model with
    grouped-query attention (``config`` has hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads)."""
    __tracebackhide__ = True
    all_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cases = [(name, config, r, targets) for (name, config), (r, targets) in zip(
        _llama_configs().items(), [(8, all_targets), (4, ["q_proj", "v_proj"]), (2, all_targets)])]
    for name, config, r, targets in cases:
        case = f"{name}, r = {r}, targets {targets}"
        result = call_student(fn, config, r, list(targets), case=case)
        if isinstance(result, torch.Tensor) or type(result).__module__ == "numpy":  # a NumPy or torch number
            if getattr(result, "ndim", 0) != 0 and len(result.reshape(-1)) != 1:
                fail(f"your count holds {len(result.reshape(-1))} numbers on {case}; return one number.")
            result = result.item()
        if not isinstance(result, numbers.Real) or isinstance(result, bool):
            fail(f"your count is a {type(result).__name__} on {case}; return a number.")
        expected = _reference_count(config, r, targets)
        if result == expected:
            continue
        h, m, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
        no_gqa = dict(shapes, k_proj=(h, h), v_proj=(h, h))
        wrong = {
            "you gave k_proj and v_proj the full width; with grouped-query attention they map hidden_size to "
            "num_key_value_heads × head_dim": L * sum(r * sum(no_gqa[t]) for t in targets),
            "you counted one layer; multiply by num_hidden_layers": sum(r * sum(shapes[t]) for t in targets),
            "you counted only A (r × d_in); B (d_out × r) trains too": L * sum(r * shapes[t][0] for t in targets),
            "you counted the full d_out × d_in update; LoRA trains r·(d_in + d_out)":
                L * sum(shapes[t][0] * shapes[t][1] for t in targets),
            "you counted every projection, not only the targets": L * sum(r * sum(s) for s in shapes.values()),
        }
        for sentence, value in wrong.items():
            if result == value:
                fail(f"your count is wrong on {case}: {sentence}.")
        fail(f"your count is {result:,} on {case}, but the model has {expected:,} LoRA parameters.")
    passed("check_lora_param_count", f"your count matches LoRA built on {len(cases)} real (tiny) Llama models, "
                                     f"grouped-query attention included.")
