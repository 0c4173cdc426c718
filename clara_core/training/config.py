"""What a training run is made of: :class:`TrainConfig`, checked before any model is loaded.

The config is recorded in the registry (``training_config``) with everything needed to train the same adapter
again (``clara adapters verify --rebuild``), and its behaviour-relevant part names the run's checkpoint folder
(``metadata/runs/<key>/``), so that ``--resume`` finds the checkpoints of exactly this run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidInput
from ..types import AdapterSpec
from ..workspace import normalise_domain

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Tokens one micro-batch may hold when clara picks the micro-batch size itself on a CPU.
CPU_TOKENS_PER_MICRO_BATCH = 8192


@attrs.define
class TrainConfig:
    """One ``clara train`` invocation, as plain values."""

    base: str
    domains: list[str]
    method: str
    dataset: Path
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: list[str] | None = None
    use_rslora: bool = False
    batch_size: int = 16
    micro_batch_size: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    max_seq_len: int = 512
    truncate: bool = True
    packing: bool = True
    dtype: str = "auto"
    dev: Path | None = None
    license: str | None = None
    out_dir: Path | None = None
    resume: bool = False
    save_steps: int | None = None
    options: dict[str, Any] = attrs.field(factory=dict)

    def check(self) -> None:
        """Refuse values that can never work, before anything is loaded."""
        if self.rank < 1:
            raise InvalidInput(f"--rank must be at least 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise InvalidInput(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInput(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.batch_size < 1:
            raise InvalidInput(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise InvalidInput(f"--micro-batch-size must be at least 1, got {self.micro_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInput(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise InvalidInput(f"--epochs must be positive, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInput(f"--lr must be positive, got {self.lr}")
        if self.max_seq_len < 8:
            raise InvalidInput(f"--max-seq-len must be at least 8, got {self.max_seq_len}")
        if self.save_steps is not None and self.save_steps < 1:
            raise InvalidInput(f"--save-steps must be at least 1, got {self.save_steps}")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        if not self.domains:
            raise InvalidInput("--domain is required (for example --domain steuerrecht)")
        self.domains = [normalise_domain(d) for d in self.domains]
        self.method = self.method.strip().lower()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping named like its fields (``clara train``'s parameters); other keys are
        ignored, missing ones take the field's default."""
        names = {field.name for field in attrs.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})

    def to_record(self, inputs: RecordedInputs) -> dict[str, Any]:
        """The config as recorded in the registry (``training_config``): enough to train the same adapter
        again. Paths are stored as ``inputs`` gives them (relative to the workspace), with their sha256."""
        recorded: dict[str, Any] = {name: _plain(getattr(self, name)) for name in RECORDED_FIELDS}
        recorded.update(
            {
                "base_model_hash": inputs.base_model_hash,
                "dataset": inputs.dataset,
                "dataset_sha256": inputs.dataset_sha256,
                "dev": inputs.dev,
                "dev_sha256": inputs.dev_sha256,
                "micro_batch_size": inputs.micro_batch_size,
                "gradient_accumulation_steps": inputs.gradient_accumulation_steps,
                "world_size": inputs.world_size,
                "precision": inputs.precision,
                "lr_scheduler": "linear",
                "options": dict(sorted(self.options.items())),
                "target_modules": list(self.target_modules) if self.target_modules else None,
            }
        )
        return recorded

    @classmethod
    def from_record(
        cls, recorded: Mapping[str, Any], *, base: str, dataset: Path, dev: Path | None
    ) -> TrainConfig:
        """The config :meth:`to_record` wrote, with the base and the data sets where they are now; a field an
        older record lacks takes its default."""
        values: dict[str, Any] = {name: recorded[name] for name in RECORDED_FIELDS if name in recorded}
        values.update(
            base=base,
            dataset=dataset,
            dev=dev,
            micro_batch_size=recorded.get("micro_batch_size"),
            dtype=recorded.get("precision", "auto"),
            options=dict(recorded.get("options") or {}),
        )
        return cls.from_values(values)

    def spec(self) -> AdapterSpec:
        return AdapterSpec(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=list(self.target_modules) if self.target_modules else None,
            use_rslora=self.use_rslora,
            seed=self.seed,
            options=dict(self.options),
        )


#: Fields recorded as they are; the inputs' paths and hashes and the batch plan come from :class:`RecordedInputs`.
RECORDED_FIELDS = (
    "method",
    "domains",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "use_rslora",
    "batch_size",
    "epochs",
    "max_steps",
    "lr",
    "warmup_steps",
    "weight_decay",
    "seed",
    "max_seq_len",
    "truncate",
    "packing",
)


@attrs.frozen
class RecordedInputs:
    """What a run resolved besides the config: stored paths and hashes of its inputs and its batch plan."""

    base_model_hash: str
    dataset: str
    dataset_sha256: str
    dev: str | None
    dev_sha256: str | None
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    precision: str


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def micro_batch_plan(config: TrainConfig, world_size: int, *, on_gpu: bool) -> tuple[int, int]:
    """(micro-batch size per process, gradient accumulation steps) that make up ``--batch-size``.

    Without ``--micro-batch-size`` the micro-batch is the largest power of two that fits clara's memory
    budget (``CPU_TOKENS_PER_MICRO_BATCH`` tokens on a CPU, four times that on a GPU), capped at the batch.
    """
    per_step = config.batch_size
    if config.micro_batch_size is not None:
        micro = config.micro_batch_size
        source = f"--micro-batch-size {micro}"
    else:
        budget = CPU_TOKENS_PER_MICRO_BATCH * (4 if on_gpu else 1)
        fits = max(1, budget // config.max_seq_len)
        micro = 1 << (fits.bit_length() - 1)
        micro = min(micro, max(1, per_step // world_size))
        source = f"the micro-batch of {micro} that fits {config.max_seq_len}-token rows"
    unit = micro * world_size
    if per_step % unit:
        lower = (per_step // unit) * unit
        hint = f"use {lower} or {lower + unit}" if lower else f"use {unit}"
        processes = f" on {world_size} processes" if world_size > 1 else ""
        raise InvalidInput(
            f"--batch-size {per_step} is not a multiple of {source}{processes}; {hint}, "
            "or set --micro-batch-size to a divisor"
        )
    return micro, per_step // unit


def run_key(recorded: dict[str, Any]) -> str:
    """A stable name for a run's checkpoint folder, from the inputs that decide what is trained."""
    relevant = {
        k: v
        for k, v in recorded.items()
        if k not in {"license", "out_dir", "resumed_from_step", "base_quantization"}
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
