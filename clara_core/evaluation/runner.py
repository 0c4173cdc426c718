"""``clara eval`` and ``clara eval matrix``: check every input, evaluate, then record (all or nothing).

Order of work: every input is checked first (adapters in the registry, their files against their checksums,
one base, eval files readable, well-formed and non-empty), so a bad input costs no model load. Answers for QA and
style come from the serving engine, started in-process through the plugin manager (the server's own generation
code); perplexity, bits per byte and the style embeddings come from one transformers model of the base with
every adapter loaded by PEFT. Only when everything has been measured are the results written: the registry's
metrics history (adapter checksum and eval set sha256 with every value) and ``metadata/reports/<ts>-eval.json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .. import hashing
from ..checks import check_adapter_for_base
from ..errors import ClaraError, Conflict, InvalidInput, NotFound
from ..fileio import write_json_atomic
from ..plugins import PluginManager
from ..records import AdapterRecord, BaseRecord
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..registry import Registry

BASE_ROW = "base"
#: Metrics where a smaller value is better; every other metric is better when larger.
LOWER_IS_BETTER = {"ppl", "bpb"}
#: Default relative tolerance of the regression gate.
DEFAULT_TOLERANCE = 0.02
#: Style prompts made from the dev set when no QA file is given: this many texts, their first words.
STYLE_PROMPTS = 32
STYLE_PROMPT_WORDS = 12


@attrs.define
class EvalSet:
    """An eval file, read and hashed once."""

    kind: str  # "dev" | "qa" | "style"
    path: Path
    label: str  # workspace-relative where possible, as training records it
    sha256: str
    items: Any  # list[Example] | list[QAItem]


@attrs.define
class Options:
    window: int | None = None
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int = 48
    engine: str | None = None
    engine_options: dict[str, str] = attrs.field(factory=dict)
    progress: bool = True


@attrs.define
class Row:
    """One model (an adapter or the base) measured on one eval set."""

    target: str  # adapter id or BASE_ROW
    eval_set: EvalSet
    metrics: dict[str, float]
    details: dict[str, Any] = attrs.field(factory=dict)


def utc_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_adapters(registry: Registry, ids: Sequence[str]) -> tuple[list[AdapterRecord], BaseRecord]:
    """The adapters (checksums verified) and their one base."""
    if not ids:
        raise InvalidInput("name at least one adapter id (see 'clara adapters list')")
    records = [registry.get_adapter(i) for i in dict.fromkeys(ids)]
    hashes = {r.base_model_hash for r in records}
    if len(hashes) > 1:
        first, other = records[0], next(r for r in records if r.base_model_hash != records[0].base_model_hash)
        raise Conflict(
            f"adapters '{first.id}' and '{other.id}' were made for different bases "
            f"({first.base_model_hash[:12]}, {other.base_model_hash[:12]}); evaluate them in separate calls"
        )
    base = registry.find_base(records[0].base_model_hash)
    if base is None:
        raise NotFound(
            f"adapter '{records[0].id}' was made for base {records[0].base_model_hash[:12]}, which is not "
            "registered; add it with 'clara base add'"
        )
    for record in records:
        check_adapter_for_base(record, base)
    if not Path(base.path).is_dir():
        raise NotFound(f"base '{base.name}': its folder {base.path} is missing; restore it")
    return records, base


def load_set(kind: str, path: Path, workspace: Workspace) -> EvalSet:
    from ..training.data import load_examples
    from .qa import load_qa

    if not path.is_file():
        what = {"dev": "dev set", "qa": "QA file", "style": "style reference"}[kind]
        raise InvalidInput(f"{path}: {what} not found; give a JSONL file")
    items = load_qa(path) if kind == "qa" else load_examples(path)
    label = workspace.relative(path.resolve())
    return EvalSet(kind, path, label, hashing.sha256_file(path), items)


def recorded_dev(record: AdapterRecord, workspace: Workspace) -> Path:
    stored = (record.training_config or {}).get("dev")
    if not stored:
        raise InvalidInput(
            f"adapter '{record.id}' has no dev set recorded from training; give one with --dev FILE"
        )
    return workspace.resolve(stored)


def style_texts(items: Sequence[Any]) -> list[str]:
    """The text of reference records (the scored part for prompt/completion and chat records)."""
    out = []
    for item in items:
        if item.kind == "text":
            out.append(item.text)
        elif item.kind == "prompt_completion":
            out.append(item.completion)
        else:
            out.append(" ".join(c for r, c in item.messages if r == "assistant"))
    return out


def style_prompts(dev: EvalSet | None, qa: EvalSet | None) -> list[str]:
    if qa is not None:
        return [item.prompt for item in qa.items]
    if dev is None:
        raise InvalidInput("--style-ref needs prompts to generate from: give --qa FILE or a dev set")
    prompts = []
    for text in style_texts(dev.items)[:STYLE_PROMPTS]:
        words = text.split()
        prompts.append(" ".join(words[: min(STYLE_PROMPT_WORDS, max(1, len(words) // 2))]))
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Models


class Models:
    """The base in transformers with every adapter loaded by PEFT; ``use(target)`` switches between them."""

    def __init__(self, base: BaseRecord, adapters: Sequence[AdapterRecord]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(str(base.path))
        model: Any = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype)
        model = model.to(self.device).eval()
        self.model: Any = model
        self.peft: Any = None
        if adapters:
            from peft import PeftModel

            for record in adapters:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(
                        model, str(record.path), adapter_name=record.id, is_trainable=False
                    )
                else:
                    self.peft.load_adapter(str(record.path), adapter_name=record.id, is_trainable=False)
            self.peft.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def window(self) -> int:
        from .perplexity import default_window

        return default_window(self.model.config)

    @contextmanager
    def active(self, target: str) -> Iterator[Any]:
        """The model with ``target``'s adapter active, or with every adapter off for the base."""
        if self.peft is None:
            yield self.model
        elif target == BASE_ROW:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            self.peft.set_adapter(target)
            yield self.peft

    def score(
        self, target: str, texts: Sequence[Any], *, window: int, stride: int, options: Options, desc: str
    ) -> Any:
        from .perplexity import score

        with self.active(target) as model:
            return score(
                model,
                texts,
                window=window,
                stride=stride,
                batch_size=options.batch_size,
                pad_token_id=self.pad_id,
                progress=desc if options.progress else None,
            )

    def embed(self, texts: Sequence[str], *, window: int) -> Any:
        """Style embeddings, always from the base (every adapter off)."""
        from .style import embed

        with self.active(BASE_ROW) as model:
            return embed(model, self.tokenizer, texts, window=window)


def generate(
    plugins: PluginManager,
    base: BaseRecord,
    targets: Sequence[tuple[str, AdapterRecord | None]],
    prompts: Sequence[str],
    options: Options,
    say: Callable[[str], None],
) -> dict[str, list[str]]:
    """Greedy answers per target from the serving engine (started here, in-process)."""
    from ..serving.runner import DEFAULT_ENGINE, parse_engine_options
    from ..types import EngineOptions
    from .qa import generate_all

    registration = plugins.engine(options.engine or DEFAULT_ENGINE)
    extra = parse_engine_options(registration.options, options.engine_options, registration.name)
    engine = registration.create(base, EngineOptions(max_loaded=max(1, len(targets)), extra=extra))

    async def main() -> dict[str, list[str]]:
        await engine.start()
        try:
            out: dict[str, list[str]] = {}
            for name, record in targets:
                if record is not None:
                    await engine.load_adapter(record)
                out[name] = await generate_all(
                    engine,
                    prompts,
                    None if record is None else record.id,
                    max_tokens=options.max_tokens,
                    progress=f"generate {name}" if options.progress else None,
                )
                if record is not None:
                    await engine.unload_adapter(record.id)
            return out
        finally:
            await engine.shutdown()

    say(f"Generating {len(prompts)} answer(s) per model with the {registration.name} engine ...")
    return asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    *,
    workspace: Workspace,
    registry: Registry,
    plugins: PluginManager,
    ids: Sequence[str],
    dev: Path | None,
    qa: Path | None,
    style_ref: Path | None,
    base_too: bool,
    options: Options,
    say: Callable[[str], None],
) -> list[Row]:
    """Every row of ``clara eval``; raises before loading anything when an input is bad."""
    from .perplexity import prepare_texts
    from .qa import qa_scores
    from .style import style_scores

    records, base = resolve_adapters(registry, ids)
    targets: list[tuple[str, AdapterRecord | None]] = [(r.id, r) for r in records]
    if base_too:
        targets.append((BASE_ROW, None))
    # dev sets: the given one for every target, else each adapter's own from training
    dev_sets: dict[str, EvalSet] = {}
    dev_of: dict[str, list[str]] = {}
    if dev is not None:
        dev_set = load_set("dev", dev, workspace)
        dev_sets[dev_set.label] = dev_set
        dev_of[dev_set.label] = [name for name, _ in targets]
    elif (qa is None and style_ref is None) or any((r.training_config or {}).get("dev") for r in records):
        for record in records:
            dev_set = load_set("dev", recorded_dev(record, workspace), workspace)
            dev_sets.setdefault(dev_set.label, dev_set)
            dev_of.setdefault(dev_set.label, []).append(record.id)
        if base_too:
            for names in dev_of.values():
                names.append(BASE_ROW)
    qa_set = load_set("qa", qa, workspace) if qa is not None else None
    style_set = load_set("style", style_ref, workspace) if style_ref is not None else None
    first_dev = next(iter(dev_sets.values()), None)
    prompts_for_style = style_prompts(first_dev, qa_set) if style_set is not None else []
    window = options.window
    if options.stride is not None and window is not None and options.stride > window:
        raise InvalidInput(
            f"--stride {options.stride} is larger than --window {window}; use a smaller stride"
        )

    rows: list[Row] = []
    # 1. answers from the serving engine (QA, and the generations whose style is measured)
    answers: dict[str, list[str]] = {}
    style_answers: dict[str, list[str]] = {}
    if qa_set is not None:
        answers = generate(plugins, base, targets, [i.prompt for i in qa_set.items], options, say)
    if style_set is not None:
        if qa_set is not None:
            style_answers = answers
        else:
            style_answers = generate(plugins, base, targets, prompts_for_style, options, say)
    # 2. scores from the base and its adapters in transformers
    say(f"Loading base '{base.name}' with {len(records)} adapter(s) ...")
    models = Models(base, records)
    window = window or models.window
    stride = options.stride or max(1, window // 2)
    if stride > window:
        raise InvalidInput(f"--stride {stride} is larger than the window {window}; use a smaller stride")
    for label, dev_set in dev_sets.items():
        texts = prepare_texts(dev_set.items, models.tokenizer, path=dev_set.path)
        for name in dev_of[label]:
            result = models.score(
                name, texts, window=window, stride=stride, options=options, desc=f"ppl {name}"
            )
            rows.append(
                Row(
                    name,
                    dev_set,
                    {"ppl": result.ppl, "bpb": result.bpb},
                    {
                        "tokens": result.tokens,
                        "bytes": result.nbytes,
                        "texts": result.texts,
                        "window": window,
                        "stride": stride,
                        "seconds": round(result.seconds, 3),
                        "tokens_per_second": round(result.tokens_per_second, 1),
                    },
                )
            )
    if qa_set is not None:
        for name, _record in targets:
            rows.append(
                Row(
                    name,
                    qa_set,
                    qa_scores(qa_set.items, answers[name]),
                    {
                        "examples": [
                            {"prompt": i.prompt, "answer": i.answer, "prediction": p}
                            for i, p in list(zip(qa_set.items, answers[name], strict=True))[:20]
                        ]
                    },
                )
            )
    if style_set is not None:
        reference = models.embed(style_texts(style_set.items), window=window)
        for name, _record in targets:
            generated = [a for a in style_answers[name] if a.strip()]
            if not generated:
                rows.append(Row(name, style_set, {}, {"note": "every generation was empty"}))
                continue
            vectors = models.embed(generated, window=window)
            rows.append(
                Row(name, style_set, style_scores(vectors, reference), {"generations": len(generated)})
            )
    for row in rows:
        if any(isinstance(v, float) and math.isnan(v) for v in row.metrics.values()):
            raise ClaraError(
                f"{row.eval_set.path}: evaluation of '{row.target}' gave NaN; nothing was recorded"
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Recording, regression gate


def record(
    workspace: Workspace,
    registry: Registry,
    rows: Sequence[Row],
    *,
    command: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Metrics history rows for every adapter row, and the JSON report; one transaction for the registry."""
    stamp = utc_stamp()
    run_id = f"eval:{stamp}"
    registry.require_writable()
    report = {
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "rows": [row_json(r) for r in rows],
        **(extra or {}),
    }
    path = workspace.metadata_dir / "reports" / f"{stamp}-eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    counter = 1
    while path.exists():
        counter += 1
        path = path.with_name(f"{stamp}-{counter}-eval.json")
    try:
        with registry.transaction():
            for row in rows:
                if row.target == BASE_ROW or not row.metrics:
                    continue
                registry.add_metrics(
                    row.target,
                    recorded_names(row, registry.get_adapter(row.target)),
                    eval_set=row.eval_set.label,
                    eval_set_sha256=row.eval_set.sha256,
                    run_id=run_id,
                    details={k: v for k, v in row.details.items() if k != "examples"},
                )
            write_json_atomic(path, report)
    except BaseException:
        path.unlink(missing_ok=True)  # the registry rolled back: no report of what was not recorded
        raise
    return path


def recorded_names(row: Row, record: AdapterRecord) -> dict[str, float]:
    """A matrix cell on another domain's set is kept as ``ppl@<domain>``, so that the plain ``ppl`` (the latest
    value ``adapters list`` shows) is always measured on a set of the adapter's own domain."""
    domain = row.details.get("domain")
    if domain is None or domain in record.domain:
        return dict(row.metrics)
    return {f"{name}@{domain}": value for name, value in row.metrics.items()}


def row_json(row: Row) -> dict[str, Any]:
    return {
        "target": row.target,
        "eval_set": row.eval_set.label,
        "eval_set_kind": row.eval_set.kind,
        "eval_set_sha256": row.eval_set.sha256,
        "metrics": row.metrics,
        "details": row.details,
    }


@attrs.frozen
class Regression:
    adapter_id: str
    previous_id: str
    metric: str
    previous: float
    current: float
    eval_set: str

    def line(self) -> str:
        direction = "higher" if self.metric in LOWER_IS_BETTER else "lower"
        return (
            f"regression: '{self.adapter_id}' {self.metric} {self.current:.4f} on {self.eval_set} is {direction} "
            f"than '{self.previous_id}' {self.previous:.4f}"
        )


def previous_version(registry: Registry, record: AdapterRecord) -> AdapterRecord | None:
    """The adapter of the same domain(s) and method registered last before ``record``."""
    candidates = [
        r
        for r in registry.list_adapters(
            domain=record.domain[0] if record.domain else None, method=record.method
        )
        if r.id != record.id
        and r.domain == record.domain
        and (r.created, r.version) < (record.created, record.version)
    ]
    return max(candidates, key=lambda r: (r.created, r.version), default=None)


def regressions(
    registry: Registry, rows: Sequence[Row], tolerance: float, notes: Callable[[str], None]
) -> list[Regression]:
    """Metrics worse than the previous version's on the same eval set (same sha256) beyond ``tolerance``."""
    found: list[Regression] = []
    for row in rows:
        if row.target == BASE_ROW:
            continue
        record = registry.get_adapter(row.target)
        previous = previous_version(registry, record)
        if previous is None:
            notes(
                f"gate: '{row.target}' has no previous version of {'+'.join(record.domain)}/{record.method}"
            )
            continue
        history = registry.metrics_history(previous.id)
        for metric, value in row.metrics.items():
            older = [
                h["value"]
                for h in history
                if h["name"] == metric and h["eval_set_sha256"] == row.eval_set.sha256
            ]
            if not older:
                notes(
                    f"gate: '{previous.id}' has no {metric} on {row.eval_set.label} (sha256 {row.eval_set.sha256[:12]}); "
                    f"evaluate it there to compare"
                )
                continue
            old = older[-1]
            if metric in LOWER_IS_BETTER:
                worse = value > old * (1 + tolerance)
            else:
                worse = value < old * (1 - tolerance) - 1e-12
            if worse:
                found.append(Regression(row.target, previous.id, metric, old, value, row.eval_set.label))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Matrix


def parse_sets(values: Sequence[str]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise InvalidInput(f"--sets {value!r} must read DOMAIN=FILE (e.g. --sets steuerrecht=dev.jsonl)")
        if any(name.strip() == n for n, _ in out):
            raise InvalidInput(f"--sets names domain '{name.strip()}' twice; give each domain once")
        out.append((name.strip(), Path(file)))
    if not out:
        raise InvalidInput("give at least one --sets DOMAIN=FILE")
    return out


def matrix(
    *,
    workspace: Workspace,
    registry: Registry,
    ids: Sequence[str],
    sets: Sequence[tuple[str, Path]],
    base_too: bool,
    options: Options,
    say: Callable[[str], None],
) -> tuple[list[str], list[str], list[Row]]:
    """Perplexity of every adapter (and the base) on every domain's set: (row names, domains, rows)."""
    from .perplexity import prepare_texts

    records, base = resolve_adapters(registry, ids)
    loaded = [(domain, load_set("dev", path, workspace)) for domain, path in sets]
    names = [r.id for r in records] + ([BASE_ROW] if base_too else [])
    say(f"Loading base '{base.name}' with {len(records)} adapter(s) ...")
    models = Models(base, records)
    window = options.window or models.window
    stride = options.stride or max(1, window // 2)
    if stride > window:
        raise InvalidInput(f"--stride {stride} is larger than the window {window}; use a smaller stride")
    rows: list[Row] = []
    for domain, dev_set in loaded:
        texts = prepare_texts(dev_set.items, models.tokenizer, path=dev_set.path)
        for name in names:
            result = models.score(
                name, texts, window=window, stride=stride, options=options, desc=f"{name} on {domain}"
            )
            rows.append(
                Row(
                    name,
                    dev_set,
                    {"ppl": result.ppl, "bpb": result.bpb},
                    {
                        "domain": domain,
                        "tokens": result.tokens,
                        "bytes": result.nbytes,
                        "window": window,
                        "stride": stride,
                    },
                )
            )
    for row in rows:
        if any(math.isnan(v) for v in row.metrics.values()):
            raise ClaraError(
                f"{row.eval_set.path}: evaluation of '{row.target}' gave NaN; nothing was recorded"
            )
    return names, [d for d, _ in sets], rows


def matrix_table(
    names: Sequence[str], domains: Sequence[str], rows: Sequence[Row], metric: str
) -> list[list[str]]:
    """Table cells with the best value per column marked ``*``."""
    value = {(r.target, r.details["domain"]): r.metrics[metric] for r in rows}
    lower = metric in LOWER_IS_BETTER
    best = {d: (min if lower else max)(value[(n, d)] for n in names) for d in domains}
    table = []
    for name in names:
        cells = [name]
        for domain in domains:
            v = value[(name, domain)]
            cells.append(f"{v:.3f}{' *' if v == best[domain] else ''}")
        table.append(cells)
    return table


def plot_matrix(
    path: Path, names: Sequence[str], domains: Sequence[str], rows: Sequence[Row], metric: str
) -> None:
    """A heatmap PNG (matplotlib, imported here), best per column outlined; written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidInput(
            "--plot needs matplotlib; install it with: pip install 'clara-core[plot]'"
        ) from exc
    from matplotlib.patches import Rectangle

    value = {(r.target, r.details["domain"]): r.metrics[metric] for r in rows}
    grid = [[value[(n, d)] for d in domains] for n in names]
    lower = metric in LOWER_IS_BETTER
    low = min(min(r) for r in grid)
    span = (max(max(r) for r in grid) - low) or 1.0
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(domains), 1.2 + 0.5 * len(names)))
    image = ax.imshow(grid, cmap="viridis_r" if lower else "viridis", aspect="auto")
    ax.set_xticks(range(len(domains)), labels=list(domains), rotation=30, ha="right")
    ax.set_yticks(range(len(names)), labels=list(names))
    for j, domain in enumerate(domains):
        column = [value[(n, domain)] for n in names]
        best = (min if lower else max)(column)
        for i, v in enumerate(column):
            ax.text(
                j,
                i,
                f"{v:.2f}{'*' if v == best else ''}",
                ha="center",
                va="center",
                # dark text on the bright (yellow) end of viridis, white on the dark end
                color="black" if ((v - low) / span < 0.5) == lower else "white",
                fontsize=8,
                fontweight="bold" if v == best else "normal",
            )
            if v == best:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(f"{metric} per domain ({'lower' if lower else 'higher'} is better; * best)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"{path}: cannot write the plot ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)
