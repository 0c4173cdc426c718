"""The translation from clara's requests and options to vLLM's arguments, checked without vLLM."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from clara_plugin_vllm.errors import InvalidEngineOption, VllmRequestFailed
from clara_plugin_vllm.translate import (
    ENGINE_OPTIONS,
    VLLM_MAX_LORA_RANKS,
    ChunkTranslator,
    LoraIdAllocator,
    LoraLimits,
    check_engine_arg_names,
    derive_lora_limits,
    engine_args_kwargs,
    finish_reason,
    lora_request_kwargs,
    parse_vllm_args,
    prompt_input,
    round_up_rank,
    sampling_params_kwargs,
)

from clara_core.errors import InvalidInput
from clara_core.types import GenerationRequest

LIMITS = LoraLimits(max_loras=4, max_lora_rank=16, max_cpu_loras=8, rank_source="test")


def defaults() -> dict:
    """What ``clara serve`` hands over when no engine option is given: every declared option at its default."""
    return {o.name: o.default for o in ENGINE_OPTIONS}


# -- engine arguments ----------------------------------------------------------------------------------------


def test_engine_args_enable_lora_on_the_served_base_with_the_limits():
    kwargs = engine_args_kwargs(Path("/models/base/tiny"), "tiny", LIMITS, defaults())
    assert kwargs == {
        "model": "/models/base/tiny",
        "tokenizer": "/models/base/tiny",
        "served_model_name": "tiny",
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 16,
        "max_cpu_loras": 8,
    }


def test_scale_out_options_pass_through_unchanged_and_unset_ones_keep_vllm_defaults():
    options = defaults() | {
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 8192,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "trust_remote_code": False,
        "distributed_executor_backend": "ray",
    }
    kwargs = engine_args_kwargs(Path("/b"), "b", LIMITS, options)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["pipeline_parallel_size"] == 2
    assert kwargs["gpu_memory_utilization"] == 0.8
    assert kwargs["max_model_len"] == 8192
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["enforce_eager"] is True
    assert kwargs["distributed_executor_backend"] == "ray"
    assert "trust_remote_code" not in kwargs  # False: vLLM's default stays
    assert "quantization" not in kwargs and "data_parallel_size" not in kwargs


@pytest.mark.parametrize(
    "given",
    [
        "enable_prefix_caching=true; kv-cache-dtype=fp8;swap_space=4",
        '{"enable_prefix_caching": true, "kv_cache_dtype": "fp8", "swap_space": 4}',
        ["enable_prefix_caching=true", "kv_cache_dtype=fp8", "swap_space=4"],
    ],
)
def test_vllm_args_pass_any_other_engine_argument_with_json_values(given):
    kwargs = engine_args_kwargs(Path("/b"), "b", LIMITS, defaults() | {"vllm_args": given})
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["kv_cache_dtype"] == "fp8"
    assert kwargs["swap_space"] == 4


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("model=/elsewhere", "clara sets model itself"),
        ("enable_lora=false", "clara sets enable_lora itself"),
        ("tensor_parallel_size=2", "use the engine option -o tensor_parallel_size"),
        ("no-equals-sign", "write KEY=VALUE"),
        ("{not json", "not a valid JSON object"),
        ("[1, 2]", "write KEY=VALUE"),
    ],
)
def test_vllm_args_refuse_what_clara_manages_or_cannot_parse(entry, message):
    with pytest.raises(InvalidEngineOption, match=message):
        parse_vllm_args(entry)


def test_out_of_range_engine_options_are_refused_before_vllm_starts():
    with pytest.raises(InvalidEngineOption, match="gpu_memory_utilization"):
        engine_args_kwargs(Path("/b"), "b", LIMITS, defaults() | {"gpu_memory_utilization": 1.5})
    with pytest.raises(InvalidEngineOption, match="tensor_parallel_size"):
        engine_args_kwargs(Path("/b"), "b", LIMITS, defaults() | {"tensor_parallel_size": 0})


def test_unknown_engine_arguments_are_named():
    with pytest.raises(InvalidEngineOption, match="no engine argument enable_prefix_cachin"):
        check_engine_arg_names(
            {"model": "x", "enable_prefix_cachin": True}, ["model", "enable_prefix_caching"]
        )


def test_declared_options_are_unique_and_typed():
    names = [o.name for o in ENGINE_OPTIONS]
    assert len(names) == len(set(names))
    assert {"max_loras", "max_lora_rank", "max_cpu_loras", "tensor_parallel_size"} <= set(names)


# -- LoRA limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "expected"), [(4, 8), (16, 16), (17, 32), (64, 64), (300, 320), (600, 512)])
def test_max_lora_rank_is_the_servers_max_adapter_rank_rounded_up(rank, expected):
    limits = derive_lora_limits(defaults(), max_loaded=8, max_adapter_rank=rank)
    assert limits.max_lora_rank == expected
    assert expected in VLLM_MAX_LORA_RANKS
    assert "registry" in limits.rank_source


def test_without_adapters_the_rank_is_vllms_default_and_slots_follow_max_loaded():
    limits = derive_lora_limits(defaults(), max_loaded=6, max_adapter_rank=None)
    assert (limits.max_loras, limits.max_lora_rank, limits.max_cpu_loras) == (6, 16, 6)


def test_explicit_limits_win_over_derived_ones():
    options = defaults() | {"max_loras": 2, "max_lora_rank": 64, "max_cpu_loras": 10}
    limits = derive_lora_limits(options, max_loaded=8, max_adapter_rank=8)
    assert (limits.max_loras, limits.max_lora_rank, limits.max_cpu_loras) == (2, 64, 10)
    assert limits.rank_source == "-o max_lora_rank"


def test_a_rank_vllm_does_not_accept_is_refused_with_the_next_allowed_one():
    with pytest.raises(
        InvalidEngineOption, match=r"max_lora_rank 24 .*next one up is 32: -o max_lora_rank=32"
    ):
        derive_lora_limits(defaults() | {"max_lora_rank": 24}, max_loaded=8)


def test_cpu_cache_smaller_than_gpu_slots_is_refused():
    with pytest.raises(InvalidEngineOption, match="max_cpu_loras >= max_loras"):
        derive_lora_limits(defaults() | {"max_loras": 8, "max_cpu_loras": 4}, max_loaded=8)


def test_round_up_rank_stays_within_vllms_values():
    assert [round_up_rank(r) for r in (1, 8, 9, 256, 257, 321, 999)] == [8, 8, 16, 256, 320, 512, 512]


# -- LoRA ids and requests -----------------------------------------------------------------------------------


def test_lora_ids_are_stable_per_adapter_and_unique_across_adapters():
    ids = LoraIdAllocator()
    a, b, c = ids.id_for("a-lora-r4-v1", "sum-a"), ids.id_for("b-lora-r4-v1", "sum-b"), ids.id_for("c", "s")
    assert len({a, b, c}) == 3 and min(a, b, c) >= 1
    assert ids.id_for("a-lora-r4-v1", "sum-a") == a  # reloading keeps the id
    assert ids.id_for("b-lora-r4-v1", "sum-b") == b


def test_an_adapter_id_with_new_files_gets_a_new_lora_id():
    ids = LoraIdAllocator()
    old = ids.id_for("x-lora-r4-v1", "checksum-1")
    new = ids.id_for("x-lora-r4-v1", "checksum-2")
    assert new != old


def test_lora_request_kwargs_name_the_adapter_by_id_and_point_at_its_folder():
    adapter = SimpleNamespace(
        id="steuerrecht-lora-r16-v1", path=Path("/ws/models/adapters/steuerrecht/lora-r16-v1")
    )
    assert lora_request_kwargs(adapter, 3) == {
        "lora_name": "steuerrecht-lora-r16-v1",
        "lora_int_id": 3,
        "lora_path": "/ws/models/adapters/steuerrecht/lora-r16-v1",
    }
    with pytest.raises(ValueError):
        lora_request_kwargs(adapter, 0)


# -- sampling parameters -------------------------------------------------------------------------------------


def test_sampling_params_carry_clara_request_fields():
    request = GenerationRequest(
        prompt="Der Bescheid", max_tokens=32, temperature=0.7, top_p=0.9, stop=["\n\n", ""], seed=11
    )
    assert sampling_params_kwargs(request) == {
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 11,
    }


def test_greedy_requests_have_temperature_zero_and_no_optional_fields():
    kwargs = sampling_params_kwargs(GenerationRequest(prompt="x", max_tokens=5))
    assert kwargs == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0}
    assert sampling_params_kwargs(GenerationRequest(prompt="x", ignore_eos=True))["ignore_eos"] is True


@pytest.mark.parametrize(
    "fields", [{"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_sampling_values_are_refused(fields):
    with pytest.raises(InvalidInput):
        sampling_params_kwargs(GenerationRequest(prompt="x", **fields))


def test_prompts_go_to_vllm_as_token_ids():
    assert prompt_input([1, 2, 3]) == {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(InvalidInput):
        prompt_input([])


# -- outputs -> chunks ---------------------------------------------------------------------------------------


def request_output(text, token_ids, finish=None, prompt_ids=(5, 6, 7), finished=None):
    """The shape of vllm.outputs.RequestOutput with one CompletionOutput."""
    completion = SimpleNamespace(text=text, token_ids=list(token_ids), finish_reason=finish)
    return SimpleNamespace(
        prompt_token_ids=list(prompt_ids),
        outputs=[completion],
        finished=finish is not None if finished is None else finished,
    )


def test_delta_outputs_become_chunks_with_running_usage():
    translator = ChunkTranslator()
    chunks = [
        translator.feed(request_output("Der", [10])),
        translator.feed(request_output(" Bescheid", [11, 12])),
        translator.feed(request_output(" ist", [13], finish="length")),
    ]
    assert [c.text for c in chunks] == ["Der", " Bescheid", " ist"]
    assert [c.completion_tokens for c in chunks] == [1, 3, 4]
    assert all(c.prompt_tokens == 3 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert translator.finished


def test_an_empty_intermediate_output_yields_nothing_but_an_empty_final_one_closes_the_stream():
    translator = ChunkTranslator()
    assert translator.feed(request_output("", [])) is None
    last = translator.feed(request_output("", [], finish="stop"))
    assert last is not None and last.text == "" and last.finish_reason == "stop"


def test_cumulative_outputs_are_cut_into_deltas():
    translator = ChunkTranslator(cumulative=True)
    first = translator.feed(request_output("Der", [10]))
    second = translator.feed(request_output("Der Bescheid", [10, 11], finish="stop"))
    assert (first.text, second.text) == ("Der", " Bescheid")
    assert second.completion_tokens == 2


@pytest.mark.parametrize(
    ("vllm_reason", "clara_reason"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("repetition", "stop"), (None, None)],
)
def test_vllm_finish_reasons_map_to_claras(vllm_reason, clara_reason):
    assert finish_reason(vllm_reason) == clara_reason


def test_an_error_finish_is_an_engine_error():
    with pytest.raises(VllmRequestFailed, match="internal error"):
        ChunkTranslator().feed(request_output("", [], finish="error"))
