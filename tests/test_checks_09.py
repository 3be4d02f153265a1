"""The checks of 09_lora_causal_lm_gpu accept correct answers and refuse each wrong answer students write,
with a sentence that names it. Uses SmolLM2's real tokenizer (from the course cache)."""

from __future__ import annotations

import pytest
import torch

from course_lib import checks
from course_lib.parts.causal_lm import answer, chat
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError

DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def refused(check, fn, *args, phrase):
    with pytest.raises(CheckFailed) as info:
        check(fn, *args)
    assert phrase in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------- 09.1


def render_right(messages, add_generation_prompt=True):
    text = DEFAULT if messages[0]["role"] != "system" else ""
    for m in messages:
        text += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_join(messages, add_generation_prompt=True):
    blocks = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    head = [] if messages and messages[0]["role"] == "system" else [DEFAULT]
    return "".join(head + blocks) + ("<|im_start|>assistant\n" * bool(add_generation_prompt))


def render_no_default(messages, add_generation_prompt=True):
    return render_right(messages, add_generation_prompt).replace(DEFAULT, "")


def render_always_default(messages, add_generation_prompt=True):
    text = render_right(messages, add_generation_prompt)
    return text if text.startswith(DEFAULT) else DEFAULT + text


def render_no_generation_prompt(messages, add_generation_prompt=True):
    return render_right(messages, False)


def render_always_generation_prompt(messages, add_generation_prompt=True):
    return render_right(messages, True)


def render_no_newline_after_end(messages, add_generation_prompt=True):
    return render_right(messages, add_generation_prompt).replace("<|im_end|>\n", "<|im_end|>")


def render_space_not_newline(messages, add_generation_prompt=True):
    text = render_right(messages, add_generation_prompt)
    for role in ("system", "user", "assistant"):
        text = text.replace(f"<|im_start|>{role}\n", f"<|im_start|>{role} ")
    return text


def render_wrong_default_argument(messages, add_generation_prompt=False):
    return render_right(messages, add_generation_prompt) if add_generation_prompt else render_right(messages, False)


def render_mutates(messages, add_generation_prompt=True):
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT[len("<|im_start|>system\n"):-len("<|im_end|>\n")]})
    return render_right(messages, add_generation_prompt)


def render_default_unless_any_system(messages, add_generation_prompt=True):
    """Adds the default system message only when no message at all is a system message."""
    text = "" if any(m["role"] == "system" for m in messages) else DEFAULT
    for m in messages:
        text += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_drops_later_system_messages(messages, add_generation_prompt=True):
    """Keeps a system message only in first place (the template renders every message it is given)."""
    kept = [m for k, m in enumerate(messages) if k == 0 or m["role"] != "system"]
    return render_right(kept, add_generation_prompt)


def render_end_marker_typo(messages, add_generation_prompt=True):
    return render_right(messages, add_generation_prompt).replace("<|im_end|>", "<|end|>")


@pytest.mark.parametrize("fn", [render_right, render_join])
def test_render_chat_accepts(fn, tokenizer, capsys):
    checks.check_render_chat(fn, tokenizer)
    assert "✅ check_render_chat passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, phrase", [
    (render_no_default, "default system message"),
    (render_always_default, "only when messages[0]['role'] is not 'system'"),
    (render_no_generation_prompt, "opening the assistant's turn"),
    (render_always_generation_prompt, "add_generation_prompt is False"),
    (render_no_newline_after_end, "followed by a newline"),
    (render_space_not_newline, "newlines differ"),
    (render_mutates, "changed the messages"),
    (render_end_marker_typo, "differs from the chat template's"),
    (render_default_unless_any_system, "a system message later in the chat does not count"),
    (render_drops_later_system_messages, "differs from the chat template's"),
])
def test_render_chat_refuses(fn, phrase, tokenizer):
    refused(checks.check_render_chat, fn, tokenizer, phrase=phrase)


def test_render_chat_with_a_wrong_default_argument_still_passes_when_called_explicitly(tokenizer, capsys):
    # The check always passes add_generation_prompt explicitly, as the notebook's code does; a wrong
    # default is therefore harmless here and must not be reported as a mistake.
    checks.check_render_chat(render_wrong_default_argument, tokenizer)
    assert "passed" in capsys.readouterr().out


def test_render_chat_stub_and_crash(tokenizer):
    def stub(messages, add_generation_prompt=True):
        raise NotImplementedError("Exercise 09.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 09.1 is not done yet"):
        checks.check_render_chat(stub, tokenizer)
    with pytest.raises(StudentCodeError, match="KeyError"):
        checks.check_render_chat(lambda messages, add_generation_prompt=True: messages[0]["text"], tokenizer)


# ------------------------------------------------------------------------------------------- 09.2


def prompt_ids(tokenizer, text):          # written out here: course_lib.parts.causal_lm's is the reference of 09.2
    return list(tokenizer.apply_chat_template(chat(text), add_generation_prompt=True)["input_ids"])


def answer_ids(tokenizer, label):
    return tokenizer(answer(label) + "<|im_end|>", add_special_tokens=False)["input_ids"]


def encode_right(tokenizer, text, label):
    prompt = tokenizer.apply_chat_template(chat(text), add_generation_prompt=True)["input_ids"]
    reply = tokenizer(answer(label) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return list(prompt) + reply, [-100] * len(prompt) + reply


def encode_tensors(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    return torch.tensor(ids), torch.tensor(labels)


def encode_numpy(tokenizer, text, label):
    import numpy as np

    ids, labels = encode_right(tokenizer, text, label)
    return np.array(ids), [np.int64(v) for v in labels]


def _whole_chat(tokenizer, text, label):
    """The template of the whole chat, the answer as the assistant's message: it ends with '<|im_end|>\n'."""
    messages = chat(text) + [{"role": "assistant", "content": answer(label)}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=False)["input_ids"]), prompt_ids(
        tokenizer, text)


def encode_whole_chat(tokenizer, text, label):
    ids, prompt = _whole_chat(tokenizer, text, label)
    return ids, [-100] * len(prompt) + ids[len(prompt):]


def encode_whole_chat_newline_masked(tokenizer, text, label):
    ids, prompt = _whole_chat(tokenizer, text, label)
    return ids, [-100] * len(prompt) + ids[len(prompt):-1] + [-100]


def encode_whole_chat_unmasked(tokenizer, text, label):
    ids, _ = _whole_chat(tokenizer, text, label)
    return ids, list(ids)


def encode_whole_chat_shifted(tokenizer, text, label):
    ids, labels = encode_whole_chat(tokenizer, text, label)
    return ids, labels[1:] + [-100]


def encode_labels_are_ids(tokenizer, text, label):
    ids, _ = encode_right(tokenizer, text, label)
    return ids, list(ids)


def encode_shifted(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    return ids, labels[1:] + [-100]


def encode_zero_mask(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    return ids, [0 if v == -100 else v for v in labels]


def encode_masks_answer(tokenizer, text, label):
    prompt, reply = prompt_ids(tokenizer, text), answer_ids(tokenizer, label)
    return prompt + reply, prompt + [-100] * len(reply)


def encode_no_im_end(tokenizer, text, label):
    prompt = prompt_ids(tokenizer, text)
    reply = tokenizer(answer(label), add_special_tokens=False)["input_ids"]
    return prompt + reply, [-100] * len(prompt) + reply


def encode_no_generation_header(tokenizer, text, label):
    prompt = list(tokenizer.apply_chat_template(chat(text), add_generation_prompt=False)["input_ids"])
    reply = answer_ids(tokenizer, label)
    return prompt + reply, [-100] * len(prompt) + reply


def encode_masks_one_too_many(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    n = labels.count(-100)
    return ids, [-100] * (n + 1) + labels[n + 1:]


def encode_only_prompt(tokenizer, text, label):
    prompt = prompt_ids(tokenizer, text)
    return prompt, [-100] * len(prompt)


def encode_length_mismatch(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    return ids, labels[:-1]


def encode_batch_dim(tokenizer, text, label):
    ids, labels = encode_right(tokenizer, text, label)
    return torch.tensor([ids]), torch.tensor([labels])


@pytest.mark.parametrize("fn", [encode_right, encode_tensors, encode_numpy, encode_whole_chat,
                                encode_whole_chat_newline_masked])
def test_prompt_masking_accepts(fn, tokenizer, capsys):
    checks.check_prompt_masking(fn, tokenizer)
    assert "✅ check_prompt_masking passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, phrase", [
    (encode_labels_are_ids, "your labels are the input ids"),
    (encode_shifted, "shifted by one"),
    (encode_zero_mask, "masked the prompt with 0"),
    (encode_masks_answer, "other way round"),
    (encode_no_im_end, "lacks '<|im_end|>'"),
    (encode_no_generation_header, "add_generation_prompt=True"),
    (encode_masks_one_too_many, "mask exactly the prompt"),
    (encode_only_prompt, "only the prompt"),
    (encode_length_mismatch, "different lengths"),
    (encode_batch_dim, "one flat sequence"),
    (encode_whole_chat_unmasked, "your labels are the input ids"),
    (encode_whole_chat_shifted, "shifted by one"),
])
def test_prompt_masking_refuses(fn, phrase, tokenizer):
    refused(checks.check_prompt_masking, fn, tokenizer, phrase=phrase)


# ------------------------------------------------------------------------------------------- 09.3


def count_right(config, r, targets):
    h, m, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    return L * sum(r * (i + o) for i, o in (shapes[t] for t in targets))


def count_by_building(config, r, targets):
    from transformers import LlamaForCausalLM

    from course_lib.parts.causal_lm import peft_lora  # peft's own count

    return peft_lora(LlamaForCausalLM(config), r=r, alpha=r, targets=targets).get_nb_trainable_parameters()[0]


def _variant(**change):
    def count(config, r, targets):
        h, m, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        if change.get("no_gqa"):
            kv = h
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
        names = shapes if change.get("all_targets") else targets
        per = {"A_only": lambda i, o: r * i, "full": lambda i, o: i * o}.get(change.get("per"), lambda i, o: r * (i + o))
        total = sum(per(*shapes[t]) for t in names)
        return total if change.get("one_layer") else L * total
    return count


def count_numpy(config, r, targets):
    import numpy as np

    return np.int64(count_right(config, r, targets))


def count_numpy_float(config, r, targets):
    import numpy as np

    return np.float64(count_right(config, r, targets))


def count_tensor(config, r, targets):
    return torch.tensor(count_right(config, r, targets))


@pytest.mark.parametrize("fn", [count_right, count_by_building, count_numpy, count_numpy_float, count_tensor])
def test_lora_param_count_accepts(fn, capsys):
    checks.check_lora_param_count(fn)
    assert "✅ check_lora_param_count passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, phrase", [
    (_variant(no_gqa=True), "grouped-query attention"),
    (_variant(one_layer=True), "one layer"),
    (_variant(per="A_only"), "only A"),
    (_variant(per="full"), "full d_out × d_in"),
    (_variant(all_targets=True), "not only the targets"),
    (lambda config, r, targets: count_right(config, r, targets) + 1, "LoRA parameters"),
    (lambda config, r, targets: str(count_right(config, r, targets)), "return a number"),
    (lambda config, r, targets: torch.full((len(targets),), count_right(config, r, targets) / len(targets)),
     "return one number"),
])
def test_lora_param_count_refuses(fn, phrase):
    refused(checks.check_lora_param_count, fn, phrase=phrase)


def test_hints_have_three_levels(capsys):
    for exercise in ("09.1", "09.2", "09.3"):
        for level in (1, 2, 3):
            checks.hint(exercise, level=level)
    assert capsys.readouterr().out.count("for exercise 09.") == 9


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts import causal_lm  # noqa: E402
from course_lib.parts.causal_lm import encode as encode_by_the_book  # noqa: E402 -- bound under another name
from course_lib.parts.lora import apply_lora as inject, count_trainable  # noqa: E402


def render_with_the_template(tokenizer):
    def render_chat(messages, add_generation_prompt=True):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return render_chat


def render_with_a_saved_method(tokenizer):
    template = tokenizer.apply_chat_template          # bound before the check runs

    def render_chat(messages, add_generation_prompt=True):
        return template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return render_chat


def render_with_the_jinja_helper(tokenizer):
    from transformers.utils.chat_template_utils import render_jinja_template

    def render_chat(messages, add_generation_prompt=True):
        rendered, _ = render_jinja_template([messages], chat_template=tokenizer.chat_template,
                                            add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
        return rendered[0]
    return render_chat


def count_with_the_course_lora(config, r, targets):
    from transformers import LlamaForCausalLM

    return count_trainable(inject(LlamaForCausalLM(config), list(targets), r=r, alpha=r))


def count_with_the_course_count(config, r, targets):
    from course_lib.parts import lora as lora_module

    return count_right(config, r, targets) + 0 * lora_module.count_trainable(torch.nn.Linear(1, 1))


REFERENCE_CALLS = {
    "09.1 apply_chat_template": (checks.check_render_chat, render_with_the_template,
                                 "transformers.tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template"),
    "09.1 apply_chat_template saved under another name": (
        checks.check_render_chat, render_with_a_saved_method,
        "transformers.tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template"),
    "09.1 transformers' jinja helper": (checks.check_render_chat, render_with_the_jinja_helper,
                                        "transformers.utils.chat_template_utils.render_jinja_template"),
    "09.2 directly": (checks.check_prompt_masking, lambda tokenizer: causal_lm.encode,
                      "course_lib.parts.causal_lm.encode"),
    "09.2 under another name": (checks.check_prompt_masking, lambda tokenizer: lambda tok, text, label: encode_by_the_book(
        tok, text, label), "course_lib.parts.causal_lm.encode"),
    "09.2 the reference's pieces": (checks.check_prompt_masking, lambda tokenizer: lambda tok, text, label: (
        (p := causal_lm.prompt_ids(tok, text)) + (a := causal_lm.answer_ids(tok, label)), [-100] * len(p) + a),
        "course_lib.parts.causal_lm.prompt_ids"),
    "09.3 the course's LoRA under other names": (checks.check_lora_param_count, lambda tokenizer: count_with_the_course_lora,
                                                "course_lib.parts.lora.apply_lora"),
    "09.3 the course's count": (checks.check_lora_param_count, lambda tokenizer: count_with_the_course_count,
                                "course_lib.parts.lora.count_trainable"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name, tokenizer):
    check, make, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(make(tokenizer), *([tokenizer] if check is not checks.check_lora_param_count else []))
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_the_masking_exercise_may_use_the_chat_template(tokenizer, capsys):
    # 09.2 forbids the course's encode and its pieces, not the tokenizer's chat template (the notebook's solution)
    checks.check_prompt_masking(encode_right, tokenizer)
    assert "✅ check_prompt_masking passed" in capsys.readouterr().out
