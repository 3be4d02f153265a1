"""Exercise checks: run a student's code against the reference and say, in one sentence, what is wrong.

How exercises work is shown in notebooks/00_setup.ipynb ("How an exercise looks").

A check
* calls the student's function or class on several cases (edge cases included),
* prints one friendly line when everything agrees with the reference,
* raises :class:`CheckFailed` (an ``AssertionError``) with one sentence naming the mistake otherwise,
* reports an exception raised inside the student's code briefly, as such,
* reports an untouched stub (``raise NotImplementedError``) as :class:`NotAttempted`.

Wrong answers are named by *diagnosis*: the check computes what the common wrong answers would
return (summing instead of averaging, the wrong axis, a missing scale ...) and, if the student's
output matches one of them, says so. Every check has tests that feed it those wrong answers
(tests/test_checks*.py).

The framework is ``checks.framework``; each lesson's checks live in a module named after it
(``checks.attention`` for 01_attention, ...). Everything public is re-exported here, so notebooks
write ``from course_lib import checks`` and call ``checks.check_softmax(...)``, ``checks.hint("01.1")``.
"""

from __future__ import annotations

from course_lib.checks.framework import (  # noqa: F401
    CheckFailed, NotAttempted, StudentCodeError, HINTS, register_hint, hint, fail, stub_message,
    not_attempted_message, call_student, require_tensor, close, diagnose, compare, passed,
    accepts_keyword, ReferenceCalled, Exercise, EXERCISES, DEFAULT_POINTS, exercise, exercise_of, student_code,
    PASSED, yours_or_reference,
)
from course_lib.checks.setup import (  # noqa: F401
    check_mse,
)
from course_lib.checks.attention import (  # noqa: F401
    check_softmax, check_causal_mask, check_attention, check_attention_backward,
)
from course_lib.checks.cross_entropy import (  # noqa: F401
    check_cross_entropy_grad, check_log_softmax, check_numerical_grad,
)
from course_lib.checks.transformer_block import (  # noqa: F401
    check_layer_norm, check_param_count, check_layer_norm_backward, check_rope,
)
from course_lib.checks.gpt import (  # noqa: F401
    check_gpt, your_gpt,
)
from course_lib.checks.training import (  # noqa: F401
    check_lr_schedule, check_top_k, check_merge_step, check_kv_cache_step,
)
from course_lib.checks.training_loop import (  # noqa: F401
    check_train_loop, course_loop,
)
from course_lib.checks.scaling_laws import (  # noqa: F401
    check_isoflop_vertex, check_power_law_fit, check_compute_optimal, check_scaling_prediction,
)
from course_lib.checks.finetuning import (  # noqa: F401
    check_mean_pooling, METRIC_KEYS, check_precision_recall_f1, check_paired_bootstrap,
)
from course_lib.checks.lora import (  # noqa: F401
    check_lora_forward, check_lora_linear, check_apply_lora, check_lora_grads,
)
from course_lib.checks.peft_family import (  # noqa: F401
    check_quantize_nf4, check_prompt_forward, check_subspace_similarity,
)
from course_lib.checks.lora_causal_lm import (  # noqa: F401
    check_render_chat, check_prompt_masking, check_lora_param_count,
)
from course_lib.checks.scaling_out import (  # noqa: F401
    check_zero_memory, check_ring_all_reduce, check_all_reduce_time, check_data_parallel,
)
from course_lib.checks.model_parallelism import (  # noqa: F401
    check_shard_qkv, check_gpipe_idle_fraction, check_activation_bytes, check_megatron_mlp, check_gpipe_schedule,
)
