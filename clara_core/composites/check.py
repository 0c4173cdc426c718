"""``clara composite build --check``: what a composite keeps of each component's perplexity gain.

The evaluation suite's matrix (``clara eval matrix``: one model of the base with every adapter loaded by PEFT,
the same perplexity code) scores the base, every component and the composite on each component's dev set, the
one recorded when the component was trained. For component ``c`` on its own set::

    kept(c) = (ppl_base - ppl_composite) / (ppl_base - ppl_c)

1.0 keeps the whole gain, 0 none, above 1 the composite is better there than the component itself. The matrix
rows and one ``kept@<domain>`` value per component go to the composite's metrics history through the same
recording path ``clara eval`` uses, so ``clara composite show`` prints them afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import InvalidInput
from ..records import AdapterRecord
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..evaluation.runner import Options, Row
    from ..registry import Registry

#: Metric name prefix of the kept fraction in the composite's metrics history (``kept@steuerrecht``).
KEPT = "kept"


@attrs.frozen
class CheckSet:
    """A component and its dev set from training, under a matrix column label (its domain)."""

    component_id: str
    label: str
    path: Path


@attrs.frozen
class Kept:
    component_id: str
    domain: str
    eval_set: str
    ppl_base: float
    ppl_component: float
    ppl_composite: float

    @property
    def gain(self) -> float:
        return self.ppl_base - self.ppl_component

    @property
    def kept(self) -> float | None:
        """None where the component does not beat the base on its own set (no gain to keep)."""
        return None if self.gain <= 0 else (self.ppl_base - self.ppl_composite) / self.gain

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component_id,
            "domain": self.domain,
            "eval_set": self.eval_set,
            "ppl_base": self.ppl_base,
            "ppl_component": self.ppl_component,
            "ppl_composite": self.ppl_composite,
            "kept": self.kept,
        }


def plan(
    components: Sequence[AdapterRecord], workspace: Workspace, warn: Callable[[str], None]
) -> list[CheckSet]:
    """Each component's recorded dev set; components without one are skipped with a warning, and a check
    with none at all is refused (before anything is built or loaded)."""
    sets: list[CheckSet] = []
    missing: list[str] = []
    labels: set[str] = set()
    for record in components:
        stored = (record.training_config or {}).get("dev")
        if not stored:
            missing.append(record.id)
            continue
        path = workspace.resolve(stored)
        if not path.is_file():
            raise InvalidInput(
                f"--check: the dev set of '{record.id}' recorded at training, {stored}, is missing; restore it"
            )
        label = ".".join(record.domain) or record.id
        if label in labels:  # two components of one domain: one column each
            label = record.id
        labels.add(label)
        sets.append(CheckSet(record.id, label, path))
    if missing and not sets:
        raise InvalidInput(
            f"--check: no component has a dev set recorded from training ({', '.join(missing)}); train them "
            "with --dev FILE, or compare by hand with: clara eval matrix IDS --base-too --sets DOMAIN=FILE"
        )
    if missing:
        warn(
            f"warning: --check skips {', '.join(repr(m) for m in missing)}: no dev set recorded from training "
            "(train with --dev FILE to include it)"
        )
    return sets


def run_check(
    *,
    workspace: Workspace,
    registry: Registry,
    composite_id: str,
    sets: Sequence[CheckSet],
    options: Options,
    say: Callable[[str], None],
) -> tuple[list[Kept], Path]:
    """Score the matrix, compute the kept fractions, record both (one transaction) and return them."""
    from ..evaluation import runner

    ids = list(dict.fromkeys([s.component_id for s in sets] + [composite_id]))
    _names, _domains, rows = runner.matrix(
        workspace=workspace,
        registry=registry,
        ids=ids,
        sets=[(s.label, s.path) for s in sets],
        base_too=True,
        options=options,
        say=say,
    )
    results = kept_from_rows(composite_id, sets, rows)
    kept_rows = kept_rows_for(composite_id, results, rows)
    report = runner.record(
        workspace,
        registry,
        [*rows, *kept_rows],
        command="composite check",
        extra={"composite": composite_id, "kept": [k.to_json() for k in results]},
    )
    return results, report


def kept_from_rows(composite_id: str, sets: Sequence[CheckSet], rows: Sequence[Row]) -> list[Kept]:
    from ..evaluation.runner import BASE_ROW

    value = {(r.target, r.details["domain"]): r for r in rows}
    out = []
    for s in sets:
        base, component, composite = (value[(t, s.label)] for t in (BASE_ROW, s.component_id, composite_id))
        out.append(
            Kept(
                s.component_id,
                s.label,
                component.eval_set.label,
                base.metrics["ppl"],
                component.metrics["ppl"],
                composite.metrics["ppl"],
            )
        )
    return out


def kept_rows_for(composite_id: str, results: Sequence[Kept], rows: Sequence[Row]) -> list[Row]:
    """One history row per component with a gain: ``kept@<domain>`` on that component's dev set."""
    from ..evaluation.runner import Row

    eval_sets = {(r.target, r.details["domain"]): r.eval_set for r in rows}
    out = []
    for k in results:
        if k.kept is None:
            continue
        out.append(
            Row(
                composite_id,
                eval_sets[(composite_id, k.domain)],
                {f"{KEPT}@{k.domain}": k.kept},
                {
                    "component": k.component_id,
                    "ppl_base": k.ppl_base,
                    "ppl_component": k.ppl_component,
                    "ppl_composite": k.ppl_composite,
                },
            )
        )
    return out


def recorded(registry: Registry, composite_id: str) -> list[dict[str, Any]]:
    """The latest check's kept fractions from the composite's metrics history (empty when never checked)."""
    history = [h for h in registry.metrics_history(composite_id) if h["name"].startswith(KEPT + "@")]
    if not history:
        return []
    latest = history[-1]["run_id"]
    return [
        {
            "component": h["details"].get("component"),
            "domain": h["name"][len(KEPT) + 1 :],
            "eval_set": h["eval_set"],
            "ppl_base": h["details"].get("ppl_base"),
            "ppl_component": h["details"].get("ppl_component"),
            "ppl_composite": h["details"].get("ppl_composite"),
            "kept": h["value"],
            "run_id": h["run_id"],
        }
        for h in history
        if h["run_id"] == latest
    ]


def table(items: Sequence[Any]) -> list[list[str]]:
    """Rows for ``echo_table`` (Kept objects or recorded dicts)."""
    out = []
    for item in items:
        k = item.to_json() if isinstance(item, Kept) else item
        kept = k["kept"]
        out.append(
            [
                k["component"],
                k["domain"],
                f"{k['ppl_base']:.4f}",
                f"{k['ppl_component']:.4f}",
                f"{k['ppl_composite']:.4f}",
                "n/a (no gain)" if kept is None else f"{100 * kept:.1f}%",
            ]
        )
    return out


HEADERS = ("COMPONENT", "DOMAIN", "PPL BASE", "PPL COMPONENT", "PPL COMPOSITE", "KEPT")
