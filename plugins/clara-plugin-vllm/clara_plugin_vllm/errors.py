"""The vLLM engine's user-facing errors: each one line that says what went wrong and what to do."""

from __future__ import annotations

from clara_core.plugin_api import ClaraError, Conflict, InvalidInput

#: The line a user reads when the ``vllm`` engine is asked for on a machine without vLLM.
NOT_INSTALLED = (
    "vLLM is not installed, so the 'vllm' engine cannot start: pip install vllm on a CUDA machine "
    "(vLLM needs an NVIDIA GPU and brings its own torch), or use --engine transformers, which runs anywhere"
)


class VllmNotInstalled(ClaraError):
    """``import vllm`` fails: not installed, or installed without a working CUDA stack."""

    code = "engine_unavailable"
    http_status = 503


class VllmStartFailed(ClaraError):
    """vLLM was importable but its engine did not come up (no GPU, out of memory, bad engine argument)."""

    code = "engine_start_failed"
    http_status = 503


class AdapterNotServable(Conflict):
    """The adapter is registered and intact, but vLLM cannot serve it (DoRA, modules_to_save, rank, ...)."""

    code = "adapter_not_servable"


class AdapterLoadFailed(ClaraError):
    """vLLM refused or failed to load an adapter that passed clara's own checks."""

    code = "adapter_load_failed"
    http_status = 500


class VllmRequestFailed(ClaraError):
    """vLLM failed a generation request for a reason of its own (engine dead, internal error)."""

    code = "engine_error"
    http_status = 500


class InvalidEngineOption(InvalidInput):
    """An engine option (``-o max_lora_rank=...``, ``-o vllm_args=...``) that vLLM would not accept."""

    code = "invalid_engine_option"
