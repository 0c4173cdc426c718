"""The shared training loop: transformers' Trainer on packed rows, with progress, checkpoints and Ctrl-C.

Every trainer method runs through :func:`run_trainer`; the method only decided how the base was loaded and
how the PEFT config was built. The same code runs in one process or under ``torchrun`` / ``accelerate
launch`` (DDP): the Trainer shards the data, and only the main process saves checkpoints.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from ..errors import ClaraError
from .data import IGNORE_INDEX, PackedCollator, PackedDataset, PackedRow, TokenCounter

CHECKPOINT_PREFIX = "checkpoint-"
#: Files a Trainer checkpoint needs before ``--resume`` may trust it.
_CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


class TrainingInterrupted(ClaraError):
    """Ctrl-C: the run stopped at a step boundary, saved a checkpoint and registered nothing."""

    exit_code = 130
    code = "interrupted"


@attrs.define
class LoopResult:
    steps: int
    train_loss: float | None
    first_loss: float | None
    last_loss: float | None
    tokens: int
    seconds: float
    resumed_from_step: int | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``run_dir`` that have every file a resume needs, oldest first."""
    found: list[tuple[int, Path]] = []
    if not run_dir.is_dir():
        return found
    for child in run_dir.iterdir():
        if not child.is_dir() or not child.name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            step = int(child.name[len(CHECKPOINT_PREFIX) :])
        except ValueError:
            continue
        # The Trainer writes trainer_state.json last: when it is there and parses, the rest was written before.
        if all((child / name).is_file() for name in _CHECKPOINT_FILES) and _readable_json(
            child / "trainer_state.json"
        ):
            found.append((step, child))
    return sorted(found)


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _make_callbacks(
    total_steps_hint: int,
    counter: TokenCounter,
    interrupted: Callable[[], bool],
    echo: Callable[[str], None] | None,
    show_progress: bool,
) -> tuple[Any, dict[str, Any]]:
    from transformers import TrainerCallback

    stats: dict[str, Any] = {"losses": [], "start": None, "start_tokens": 0}

    class ClaraProgress(TrainerCallback):
        """A tqdm bar with step, loss and tokens/s; checkpoint and Ctrl-C handling at step boundaries."""

        bar: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            stats["start"] = time.perf_counter()
            stats["start_tokens"] = counter.tokens
            if show_progress and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=state.max_steps or total_steps_hint,
                    initial=state.global_step,
                    desc="training",
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if interrupted():
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                stats["losses"].append(float(logs["loss"]))
                if self.bar is not None:
                    elapsed = time.perf_counter() - stats["start"]
                    rate = (counter.tokens - stats["start_tokens"]) / elapsed if elapsed > 0 else 0.0
                    self.bar.set_postfix_str(f"loss {logs['loss']:.4f}, {rate:,.0f} tok/s")

        def on_save(self, args, state, control, **kwargs):
            if echo is not None and state.is_world_process_zero:
                message = f"checkpoint saved at step {state.global_step}"
                if self.bar is not None:
                    self.bar.write(message, file=sys.stderr)
                else:
                    echo(message)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            """End the bar's line, also when training fails, so that the error starts a line of its own."""
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ClaraProgress(), stats


@contextmanager
def _catch_sigint() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step; a second one aborts at once."""
    state = {"hit": False}
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if state["hit"]:
            raise KeyboardInterrupt
        state["hit"] = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (press again to abort at once) ...",
            file=sys.stderr,
        )

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield lambda: False
        return
    try:
        yield lambda: state["hit"]
    finally:
        signal.signal(signal.SIGINT, previous)


def run_trainer(
    model: Any,
    rows: Sequence[PackedRow],
    *,
    run_dir: Path,
    micro_batch: int,
    accumulation: int,
    epochs: float,
    max_steps: int | None,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    save_steps: int | None,
    precision: str,
    on_gpu: bool,
    world_size: int,
    pad_token_id: int,
    resume_from: Path | None,
    echo: Callable[[str], None] | None,
    show_progress: bool = True,
) -> LoopResult:
    """Train ``model`` (a PEFT model) on ``rows``; checkpoints go to ``run_dir``."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    rows_per_step = micro_batch * accumulation * world_size
    steps_per_epoch = max(1, math.ceil(len(rows) / rows_per_step))
    planned = max_steps or max(1, math.ceil(steps_per_epoch * epochs))
    every = save_steps or max(1, min(200, math.ceil(planned / 10)))
    args = TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        full_determinism=not on_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not on_gpu,
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        ddp_backend="gloo" if (world_size > 1 and not on_gpu) else None,
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=world_size > 1,
        skip_memory_metrics=True,
    )
    counter = TokenCounter()
    with _catch_sigint() as interrupted:
        progress, stats = _make_callbacks(planned, counter, interrupted, echo, show_progress)
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=PackedCollator(pad_token_id, counter),
            train_dataset=PackedDataset(rows),
            callbacks=[progress],
        )
        for default in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(default)
        resumed_step = None
        if resume_from is not None:
            resumed_step = int(resume_from.name[len(CHECKPOINT_PREFIX) :])
        try:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            progress.close()
        if interrupted():
            raise TrainingInterrupted(
                f"interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}; nothing was "
                f"registered; the checkpoint in {run_dir} is kept: run the same command with --resume to continue"
            )
    seconds = time.perf_counter() - (stats["start"] or time.perf_counter())
    losses = stats["losses"]
    return LoopResult(
        steps=trainer.state.global_step,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        tokens=counter.tokens,
        seconds=seconds,
        resumed_from_step=resumed_step,
    )


def perplexity(model: Any, rows: Sequence[PackedRow], *, micro_batch: int, pad_token_id: int) -> float:
    """Token-weighted perplexity of ``model`` over ``rows`` (the loss-carrying tokens only)."""
    import torch

    collate = PackedCollator(pad_token_id)
    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), micro_batch):
                batch = collate(
                    [
                        {"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids}
                        for r in rows[start : start + micro_batch]
                    ]
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                logits = model(**batch, use_cache=False).logits.float()
                shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss = torch.nn.functional.cross_entropy(
                    shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
                )
                total_loss += float(loss)
                total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return float("nan")
    return math.exp(total_loss / total_tokens)
