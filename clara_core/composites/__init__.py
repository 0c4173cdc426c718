"""Composite adapters: several registered adapters combined into one by a merge strategy (a plugin), stored
as a plain PEFT LoRA folder, exactly where the math allows and with the measured error where it does not.

:func:`build_composite` does the work; the tensor side lives in :mod:`clara_core.composites.tensors` (torch
is imported there at call time only).
"""

from .build import LINEAGE_FILE, CompositeRequest, CompositeResult, build_composite, composite_hash

__all__ = ["LINEAGE_FILE", "CompositeRequest", "CompositeResult", "build_composite", "composite_hash"]
