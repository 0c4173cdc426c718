"""One training run from inputs to a registered adapter, all or nothing.

1. :mod:`.plan` checks every input that can be checked cheaply (options, method, dataset, dev set, base,
   output folder) and fixes the plan. Nothing is loaded before these pass.
2. Tokenise and pack; load the base the method's way; wrap it with the method's PEFT config.
3. Train with the shared loop (:mod:`.loop`); checkpoints live in ``metadata/runs/<run key>/`` so ``--resume``
   finds them.
4. Evaluate ``ppl_dev``; :mod:`.publish` saves the adapter into a staging folder inside the workspace with
   clara's metadata file and registers it with ``place="move"`` (rename into place and record, one
   transaction).

Killed at any moment, the run leaves no adapter folder in ``models/`` and no registry row; only its
checkpoints (for ``--resume``) and a staging folder under ``metadata/tmp`` that the next run clears. A run that
fails with an error leaves no run folder unless it holds a checkpoint to resume from.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import ClaraError, Conflict, InvalidInput, NotFound, first_line
from ..plugins import PluginManager
from ..registry import AdapterRecord
from ..types import AdapterSpec, TrainerMethodImpl
from ..workspace import Workspace
from . import data as data_mod
from .config import TrainConfig
from .loop import CHECKPOINT_PREFIX, LoopResult, complete_checkpoints, run_trainer
from .plan import (
    RunPlan,
    local_rank_device_map,
    method_options,
    plan_run,
    resolve_base,
    short_run_warning,
)

if TYPE_CHECKING:
    from ..evaluation.perplexity import ScoredText
from .publish import (
    METADATA_FILE,
    DiskFull,
    check_initialisation,
    clear_stale_staging,
    is_disk_full,
    jsonable,
    publish,
    rerun_advice,
    snapshot_initial_adapter,
    staging_root,
)

#: Free bytes below which a failed checkpoint write is reported as a full disk (torch's writer does not say).
LOW_DISK_BYTES = 64 << 20


@attrs.define
class TrainResult:
    record: AdapterRecord | None
    adapter_checksum: str
    metrics: dict[str, float]
    loop: LoopResult
    summary: data_mod.DatasetSummary
    base: str
    path: Path | None


@attrs.define
class _Dist:
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> _Dist:
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")))


@attrs.define
class _Data:
    rows: list[data_mod.PackedRow]
    dev_texts: list[ScoredText]
    summary: data_mod.DatasetSummary
    pad_id: int


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    # bitsandbytes warns at import that an optional CPU speed-up kernel is missing; it changes no result.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*gradient.checkpointing.*", category=UserWarning)


def _prepare_data(plan: RunPlan, say: Callable[[str], None]) -> _Data:
    """Tokenise and pack the dataset and the dev set with the base's tokenizer; report what was cut."""
    from transformers import AutoTokenizer

    config = plan.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(plan.base.path))
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"{plan.base.path}: the base has no usable tokenizer ({first_line(exc)}); add its tokenizer files"
        ) from exc
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized, dropped = data_mod.tokenize_examples(
        plan.examples,
        tokenizer,
        path=config.dataset,
        max_seq_len=config.max_seq_len,
        truncate=config.truncate,
    )
    rows = data_mod.pack(tokenized, config.max_seq_len) if config.packing else data_mod.unpacked(tokenized)
    summary = data_mod.summarise(plan.examples, tokenized, dropped, len(rows))
    dev_texts: list[ScoredText] = []
    if plan.dev_examples is not None and config.dev is not None:
        # Scored as 'clara eval' scores it (same function, sliding windows, nothing cut), so both agree.
        from ..evaluation.perplexity import prepare_texts

        dev_texts = prepare_texts(plan.dev_examples, tokenizer, path=config.dev)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary.kinds.items()))
    say(
        f"Dataset {config.dataset}: {summary.examples} records ({kinds}), {summary.tokens:,} tokens "
        f"({summary.trained_tokens:,} with loss) in {summary.rows} packed rows of <= {config.max_seq_len}"
    )
    if summary.truncated:
        first = [t.line for t in tokenized if t.truncated][:5]
        say(
            f"warning: {summary.truncated} record(s) longer than --max-seq-len {config.max_seq_len} were cut "
            f"(lines {', '.join(map(str, first))}{', ...' if summary.truncated > 5 else ''}); --no-truncate refuses them"
        )
    if dropped:
        say(f"warning: {len(dropped)} record(s) had no token left to learn after cutting and are skipped")
    short = short_run_warning(config, len(rows), plan.micro * plan.accumulation * plan.world_size)
    if short:
        say(short)
    return _Data(rows, dev_texts, summary, pad_id if pad_id is not None else 0)


@contextmanager
def _run_folder(run_dir: Path) -> Iterator[None]:
    """One process per run folder (a second 'clara train' with the same inputs is refused, not interleaved);
    a run that fails keeps its folder only when it holds a complete checkpoint to ``--resume`` from."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            created = False  # another process's folder: never remove it
            raise Conflict(
                f"another 'clara train' with the same inputs is running (it holds {run_dir / '.lock'}); "
                "wait for it to finish"
            ) from exc
        try:
            yield
        except BaseException:
            if not complete_checkpoints(run_dir):
                _remove_run_folder(run_dir)
            raise
    finally:
        handle.close()
        if created and run_dir.is_dir() and not any(p.name != ".lock" for p in run_dir.iterdir()):
            _remove_run_folder(run_dir)


def _remove_run_folder(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    with suppress(OSError):
        run_dir.parent.rmdir()  # metadata/runs, when this was its only run


def _start_or_resume(plan: RunPlan, say: Callable[[str], None], main: bool) -> Path | None:
    """The checkpoint to resume from, or ``None`` for a fresh start (leftovers of a killed run cleared)."""
    run_dir = plan.run_dir
    checkpoints = complete_checkpoints(run_dir)
    if plan.config.resume:
        if not checkpoints:
            raise NotFound(
                f"--resume: no checkpoint of a run with these inputs in {run_dir}; run without --resume"
            )
        say(f"Resuming from {checkpoints[-1][1].name} in {run_dir}")
        return checkpoints[-1][1]
    if checkpoints:
        raise Conflict(
            f"an interrupted run with these inputs left a checkpoint at step {checkpoints[-1][0]} in {run_dir}; "
            "continue it with --resume, or delete that folder to start over"
        )
    if main and run_dir.exists():
        for child in run_dir.iterdir():  # leftovers of a run killed before its first complete checkpoint
            if child.name != ".lock":
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    return None


def _is_checkpoint_write_failure(exc: BaseException, run_dir: Path) -> bool:
    """An OSError on a file of the run folder, a full disk, or torch's writer failing: it reports a failed
    write as a RuntimeError without errno ('unexpected pos ...', 'PytorchStreamWriter failed writing file')."""
    if is_disk_full(exc):
        return True
    if isinstance(exc, OSError):
        return str(run_dir) in str(exc.filename or "")
    text = f"{exc} {exc.__context__ or ''}"
    return isinstance(exc, RuntimeError) and any(
        marker in text
        for marker in ("PytorchStreamWriter", "inline_container", "file write failed", "iostream error")
    )


def _checkpoint_failure(exc: BaseException, run_dir: Path) -> ClaraError | None:
    """A one-line error for a checkpoint that could not be written (``None``: not a write failure)."""
    if not _is_checkpoint_write_failure(exc, run_dir):
        return None
    for partial in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):  # a half-written checkpoint only takes space
        if partial not in {path for _, path in complete_checkpoints(run_dir)}:
            shutil.rmtree(partial, ignore_errors=True)
    advice = rerun_advice(run_dir)
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = None
    if is_disk_full(exc) or (free is not None and free < LOW_DISK_BYTES):
        return DiskFull(f"disk full while writing a checkpoint to {run_dir}; free space, then {advice}")
    left = f", {free >> 20} MiB free" if free is not None else ""
    return ClaraError(
        f"could not write a checkpoint to {run_dir} ({first_line(exc)}{left}); check that the folder is "
        f"writable and its disk has room, then {advice}"
    )


def _build_model(plan: RunPlan) -> tuple[Any, list[str], str | None]:
    """The base loaded the method's way and wrapped with its PEFT config; also the base-changing
    initialisation the config asks for, if any (refused here when clara cannot convert it)."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    from .methods import resolve_target_modules

    impl: TrainerMethodImpl = plan.impl
    spec: AdapterSpec = plan.spec
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[plan.precision]
    set_seed(plan.config.seed)
    model = impl.load_base(plan.base.path, spec, dtype=dtype, device_map=local_rank_device_map(plan.on_gpu))
    model.config.use_cache = False
    model = impl.prepare(model, spec)
    target_modules = resolve_target_modules(model, plan.config.target_modules)
    peft_config = impl.peft_config(model, spec, target_modules)
    base_changing = check_initialisation(peft_config, plan.config.method)
    set_seed(
        plan.config.seed
    )  # the adapter's initial weights depend on the seed only, not on how the base was loaded
    peft_model = get_peft_model(model, peft_config)
    quantization = getattr(peft_model.base_model.model.config, "quantization_config", None)
    if quantization is not None:  # how the base was held in memory while training (qlora's 4 / 8 bit)
        plan.recorded["base_quantization"] = jsonable(
            quantization.to_dict() if hasattr(quantization, "to_dict") else quantization
        )
    return peft_model, target_modules, base_changing


def train_adapter(
    config: TrainConfig,
    workspace: Workspace,
    plugins: PluginManager,
    *,
    echo: Callable[[str], None] | None = None,
    register: bool = True,
    show_progress: bool = True,
    run_dir: Path | None = None,
) -> TrainResult:
    """Train and (when ``register``) register one adapter; see the module docstring for the steps."""
    dist = _Dist.from_environment()
    say: Callable[[str], None] = (
        (echo or (lambda line: print(line, file=sys.stderr))) if dist.main else (lambda line: None)
    )
    plan = plan_run(
        config, workspace, plugins, register=register, world_size=dist.world_size, run_dir=run_dir
    )
    if not plan.base.registered and register:
        say(
            f"Base {plan.base.path} is not registered yet; it is registered as '{plan.base.name}' with the adapter"
        )
    _quiet_libraries()
    data = _prepare_data(plan, say)

    try:
        return _train(plan, workspace, data, dist, say, register=register, show_progress=show_progress)
    except BaseException:
        if register:  # the snapshot of a base-changing initialisation, a half-saved adapter
            shutil.rmtree(staging_root(workspace, plan), ignore_errors=True)
        raise


def _train(
    plan: RunPlan,
    workspace: Workspace,
    data: _Data,
    dist: _Dist,
    say: Callable[[str], None],
    *,
    register: bool,
    show_progress: bool,
) -> TrainResult:
    config = plan.config
    with _run_folder(plan.run_dir) if dist.main else nullcontext():
        resume_from = _start_or_resume(plan, say, dist.main)
        peft_model, target_modules, base_changing = _build_model(plan)
        initial: Path | None = None
        if base_changing is not None and dist.main:
            clear_stale_staging(workspace)
            initial = snapshot_initial_adapter(peft_model, staging_root(workspace, plan) / "initial")
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        say(
            f"Training {config.method} r={config.rank} on '{plan.base.name}' ({len(target_modules)} module kinds: "
            f"{', '.join(target_modules)}; {trainable:,} of {total:,} parameters trainable), batch "
            f"{config.batch_size} = {plan.micro} x {plan.accumulation} accumulation"
            + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
        )
        try:
            loop = run_trainer(
                peft_model,
                data.rows,
                run_dir=plan.run_dir,
                micro_batch=plan.micro,
                accumulation=plan.accumulation,
                epochs=config.epochs,
                max_steps=config.max_steps,
                lr=config.lr,
                warmup_steps=config.warmup_steps,
                weight_decay=config.weight_decay,
                seed=config.seed,
                save_steps=config.save_steps,
                precision=plan.precision,
                on_gpu=plan.on_gpu,
                world_size=dist.world_size,
                pad_token_id=data.pad_id,
                resume_from=resume_from,
                echo=say,
                show_progress=show_progress,
            )
        except (OSError, RuntimeError) as exc:
            failure = _checkpoint_failure(exc, plan.run_dir)
            if failure is None:
                raise
            raise failure from exc
        if not dist.main:
            return TrainResult(None, "", {}, loop, data.summary, plan.base.name, None)

        say(
            f"Trained {loop.steps} step{'s' if loop.steps != 1 else ''} in {loop.seconds:.1f} s "
            f"({loop.tokens_per_second:,.0f} tokens/s), loss {_fmt(loop.first_loss)} -> {_fmt(loop.last_loss)}"
        )
        metrics = _evaluate(peft_model, loop, data, plan.micro, say)
        plan.recorded["resumed_from_step"] = loop.resumed_from_step
        clear_stale_staging(workspace)
        published = publish(
            peft_model,
            plan,
            workspace,
            metrics=metrics,
            target_modules=target_modules,
            register=register,
            echo=say,
            initial=initial,
        )
        if register:
            shutil.rmtree(
                plan.run_dir, ignore_errors=True
            )  # the run is complete: its checkpoints are not needed
    return TrainResult(
        published.record,
        published.checksum,
        metrics,
        loop,
        data.summary,
        plan.base.name,
        published.path,
    )


def _evaluate(
    peft_model: Any, loop: LoopResult, data: _Data, micro: int, say: Callable[[str], None]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if loop.train_loss is not None:
        metrics["train_loss"] = round(loop.train_loss, 6)
    if data.dev_texts:
        from ..evaluation.perplexity import default_window, score

        window = default_window(peft_model.config)
        metrics["ppl_dev"] = score(
            peft_model, data.dev_texts, window=window, batch_size=micro, pad_token_id=data.pad_id
        ).ppl
        with peft_model.disable_adapter():
            metrics["ppl_dev_base"] = score(
                peft_model, data.dev_texts, window=window, batch_size=micro, pad_token_id=data.pad_id
            ).ppl
        say(f"ppl_dev {metrics['ppl_dev']:.3f} (base without the adapter: {metrics['ppl_dev_base']:.3f})")
    return metrics


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


__all__ = [
    "METADATA_FILE",
    "DiskFull",
    "TrainConfig",
    "TrainResult",
    "method_options",
    "resolve_base",
    "train_adapter",
]
