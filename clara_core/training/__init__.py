"""The machinery behind ``clara train``: datasets, the shared loop on transformers' Trainer, registration.

- :mod:`.data`: JSONL validation, tokenisation with loss masks, packing.
- :mod:`.config`: :class:`TrainConfig` (and how it is recorded) and the micro-batch plan.
- :mod:`.loop`: the Trainer, progress, checkpoints, Ctrl-C, perplexity.
- :mod:`.plan`: every check before a model is loaded (options, method, data, base, output folder), the run's plan.
- :mod:`.publish`: saving (converted, for base-changing initialisations), metadata and registration.
- :mod:`.run`: one run from inputs to a registered adapter, all or nothing.
- :mod:`.rebuild`: training a registered adapter again from its recorded inputs.
- :mod:`.methods`: helpers trainer-method plugins build on.

Importing this package is cheap; torch, transformers and peft load when a run starts.
"""

from __future__ import annotations

from .config import TrainConfig
from .rebuild import rebuild_adapter
from .run import METADATA_FILE, DiskFull, TrainResult, train_adapter

__all__ = ["METADATA_FILE", "DiskFull", "TrainConfig", "TrainResult", "rebuild_adapter", "train_adapter"]
