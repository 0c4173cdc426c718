"""The embedded default: a small demo base built offline, and example datasets for two domains.

A fresh machine has no base model and no network. ``clara base create-demo DIR`` (and ``clara quickstart``)
build a small Llama-architecture model whose byte-level BPE tokenizer is trained here, with the ``tokenizers``
library, on the German texts below. Its random weights are then warmed up briefly (a full, seeded fine-tune) on
background text in the chat format: general administrative questions and answers, and each domain's records
except the ones the quickstart and the dev sets ask about. So the base already writes German in the chat
format, but does not know the quickstart's answers; each domain adapter learns its domain's answers on top, a
small change of its own, which makes the effect of an adapter plain to see and lets a composite of two domain
adapters answer the questions of both.

The question/answer texts were written for this project (short paraphrases of well-known rules of German tax
and social law and of general administrative practice, simplified; not legal advice).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .errors import ClaraError
from .output import human_size
from .plugins import PluginManager
from .registry import AdapterRecord, BaseRecord, Registry
from .workspace import Workspace

#: (question, answer) pairs per domain; the first question of each domain is the one the quickstart asks.
DEMO_QA: dict[str, list[tuple[str, str]]] = {
    "steuerrecht": [
        (
            "Wer setzt die Einkommensteuer fest?",
            "Das Finanzamt setzt die Einkommensteuer durch Steuerbescheid fest.",
        ),
        (
            "Bis wann ist die Steuererklärung abzugeben?",
            "Die Steuererklärung ist bis zum 31. Juli des Folgejahres abzugeben.",
        ),
        (
            "Was ist der Grundfreibetrag?",
            "Der Grundfreibetrag ist das Einkommen, auf das keine Einkommensteuer anfällt.",
        ),
        (
            "Wie hoch ist der allgemeine Umsatzsteuersatz?",
            "Der allgemeine Umsatzsteuersatz beträgt 19 Prozent.",
        ),
        ("Wie hoch ist der ermäßigte Umsatzsteuersatz?", "Der ermäßigte Umsatzsteuersatz beträgt 7 Prozent."),
        (
            "Was sind Werbungskosten?",
            "Werbungskosten sind Aufwendungen zur Erwerbung, Sicherung und Erhaltung der Einnahmen.",
        ),
        (
            "Wie lange dauert die Einspruchsfrist gegen einen Steuerbescheid?",
            "Der Einspruch ist innerhalb eines Monats nach Bekanntgabe einzulegen.",
        ),
        (
            "Wo ist der Einspruch gegen einen Steuerbescheid einzulegen?",
            "Der Einspruch ist schriftlich beim Finanzamt einzulegen.",
        ),
        (
            "Welches Gesetz regelt die Einkommensteuer?",
            "Die Einkommensteuer ist im Einkommensteuergesetz, dem EStG, geregelt.",
        ),
        (
            "Welches Gesetz regelt das Besteuerungsverfahren?",
            "Das Besteuerungsverfahren ist in der Abgabenordnung, der AO, geregelt.",
        ),
        (
            "Was ist die Kleinunternehmerregelung?",
            "Kleinunternehmer mit geringem Umsatz müssen keine Umsatzsteuer ausweisen.",
        ),
        (
            "Wer muss eine Umsatzsteuervoranmeldung abgeben?",
            "Unternehmer melden die Umsatzsteuer monatlich oder vierteljährlich an.",
        ),
    ],
    "sozialrecht": [
        ("Wer erhält Bürgergeld?", "Bürgergeld erhalten erwerbsfähige Leistungsberechtigte nach dem SGB II."),
        ("Wo wird Bürgergeld beantragt?", "Bürgergeld wird beim zuständigen Jobcenter beantragt."),
        (
            "Was regelt das SGB XII?",
            "Das SGB XII regelt die Sozialhilfe für Menschen ohne ausreichendes Einkommen.",
        ),
        (
            "Was regelt das SGB X?",
            "Das SGB X regelt das Sozialverwaltungsverfahren und den Sozialdatenschutz.",
        ),
        (
            "Wie lange dauert die Widerspruchsfrist gegen einen Sozialleistungsbescheid?",
            "Der Widerspruch ist innerhalb eines Monats nach Bekanntgabe zu erheben.",
        ),
        (
            "Wer zahlt die Grundsicherung im Alter?",
            "Die Grundsicherung im Alter zahlt das Sozialamt nach dem SGB XII.",
        ),
        (
            "Was sind Kosten der Unterkunft?",
            "Kosten der Unterkunft sind die angemessenen Aufwendungen für Miete und Heizung.",
        ),
        ("Muss ein Umzug dem Jobcenter gemeldet werden?", "Ein Umzug ist dem Jobcenter vorher mitzuteilen."),
        (
            "Welche Pflicht haben Leistungsberechtigte?",
            "Leistungsberechtigte müssen Änderungen ihrer Verhältnisse unverzüglich mitteilen.",
        ),
        (
            "Was ist eine Eingliederungsvereinbarung?",
            "Der Kooperationsplan hält die Schritte zur Eingliederung in Arbeit fest.",
        ),
        ("Was regelt das SGB I?", "Das SGB I enthält den Allgemeinen Teil des Sozialgesetzbuchs."),
        (
            "Können Sozialleistungen zurückgefordert werden?",
            "Zu Unrecht erbrachte Leistungen sind nach dem SGB X zu erstatten.",
        ),
    ],
}

#: Held-out text for ppl_dev, per domain (same style, different wording).
DEMO_DEV: dict[str, list[tuple[str, str]]] = {
    "steuerrecht": [
        ("Welche Behörde setzt die Steuer fest?", "Das Finanzamt setzt die Steuer durch Bescheid fest."),
        ("Wie hoch ist die Umsatzsteuer im Regelfall?", "Die Umsatzsteuer beträgt im Regelfall 19 Prozent."),
    ],
    "sozialrecht": [
        ("Wer ist für das Bürgergeld zuständig?", "Für das Bürgergeld ist das Jobcenter zuständig."),
        ("Welche Frist gilt für den Widerspruch?", "Der Widerspruch ist innerhalb eines Monats zu erheben."),
    ],
}

#: General administrative (question, answer) pairs, no domain's: part of the demo base's warm-up text.
DEMO_GENERAL: list[tuple[str, str]] = [
    (
        "Wo beantrage ich einen Personalausweis?",
        "Den Personalausweis beantragen Sie persönlich bei der Personalausweisbehörde Ihres Wohnorts.",
    ),
    (
        "Wie lange ist ein Personalausweis gültig?",
        "Ein Personalausweis ist für Personen ab 24 Jahren zehn Jahre gültig.",
    ),
    ("Wo wird ein Reisepass beantragt?", "Der Reisepass wird bei der Passbehörde des Wohnorts beantragt."),
    (
        "Bis wann muss ich mich nach einem Umzug ummelden?",
        "Nach einem Umzug melden Sie sich innerhalb von zwei Wochen bei der Meldebehörde an.",
    ),
    (
        "Was ist ein Verwaltungsakt?",
        "Ein Verwaltungsakt ist eine Entscheidung einer Behörde in einem Einzelfall mit Wirkung nach außen.",
    ),
    (
        "Wann wird ein Verwaltungsakt wirksam?",
        "Ein Verwaltungsakt wird mit seiner Bekanntgabe an den Betroffenen wirksam.",
    ),
    (
        "Muss die Behörde mich vor einer Entscheidung anhören?",
        "Vor einem belastenden Verwaltungsakt ist der Betroffene in der Regel anzuhören.",
    ),
    (
        "Darf ich meine Akte bei der Behörde einsehen?",
        "Beteiligte dürfen die Akten einsehen, soweit sie ihre rechtlichen Interessen betreffen.",
    ),
    ("Muss ein Bescheid begründet werden?", "Ein schriftlicher Bescheid ist schriftlich zu begründen."),
    ("Wo melde ich ein Gewerbe an?", "Ein Gewerbe wird beim Gewerbeamt der Gemeinde angemeldet."),
    (
        "Wo wird ein Auto zugelassen?",
        "Ein Kraftfahrzeug wird bei der Zulassungsstelle des Wohnorts zugelassen.",
    ),
    ("Wo beantrage ich einen Führerschein?", "Den Führerschein beantragen Sie bei der Fahrerlaubnisbehörde."),
    ("Wo wird eine Geburt angezeigt?", "Eine Geburt ist innerhalb einer Woche beim Standesamt anzuzeigen."),
    ("Wo wird die Ehe geschlossen?", "Die Ehe wird vor dem Standesamt geschlossen."),
    ("Wer erteilt eine Baugenehmigung?", "Die Baugenehmigung erteilt die untere Bauaufsichtsbehörde."),
    (
        "Kann ich mich bei einem Antrag vertreten lassen?",
        "Sie können sich durch einen Bevollmächtigten mit schriftlicher Vollmacht vertreten lassen.",
    ),
    (
        "Was kann ich gegen einen Bußgeldbescheid tun?",
        "Gegen einen Bußgeldbescheid ist innerhalb von zwei Wochen Einspruch möglich.",
    ),
    (
        "Wie berechnet sich eine Frist nach Monaten?",
        "Eine Monatsfrist endet mit dem Tag des nächsten Monats, der dem Tag der Bekanntgabe entspricht.",
    ),
    (
        "Was gilt, wenn eine Frist am Samstag endet?",
        "Endet eine Frist an einem Samstag, Sonntag oder Feiertag, endet sie am nächsten Werktag.",
    ),
    (
        "Kostet eine Amtshandlung Gebühren?",
        "Für Amtshandlungen erheben Behörden Gebühren nach der Gebührenordnung.",
    ),
    (
        "Welche Auskunft gibt mir eine Behörde über meine Daten?",
        "Die Behörde muss Ihnen Auskunft über die zu Ihrer Person gespeicherten Daten geben.",
    ),
    ("Wie beantrage ich die Briefwahl?", "Die Briefwahl beantragen Sie beim Wahlamt Ihrer Gemeinde."),
    (
        "Wer ist für den Rundfunkbeitrag zuständig?",
        "Den Rundfunkbeitrag zieht der Beitragsservice von ARD, ZDF und Deutschlandradio ein.",
    ),
    (
        "Was ist eine Behörde?",
        "Eine Behörde ist jede Stelle, die Aufgaben der öffentlichen Verwaltung wahrnimmt.",
    ),
]

#: Each domain's records that stay out of the base's warm-up (indices into DEMO_QA): the quickstart's question and
#: the records the dev set asks about. Only the adapter learns them.
DEMO_ADAPTER_ONLY: dict[str, tuple[int, ...]] = {"steuerrecht": (0, 3, 4), "sozialrecht": (0, 1, 4)}

#: The warm-up of the demo base: full fine-tuning steps (4 packed rows each), learning rate, seed.
DEMO_WARMUP: dict[str, float] = {"steps": 200, "lr": 1e-3, "seed": 0}

#: Sizes of the demo model: small enough to train two adapters in about a minute on 2 CPU cores.
DEMO_MODEL: dict[str, int] = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_positions": 512,
    "seed": 0,
}


def demo_texts() -> list[str]:
    """Every demo text, for training the tokenizer (so German words become few tokens)."""
    texts = []
    for table in (DEMO_QA, DEMO_DEV):
        for pairs in table.values():
            for question, answer in pairs:
                texts.extend([question, answer])
    return texts


def warmup_pairs() -> list[tuple[str, str]]:
    """The demo base's warm-up text: the general pairs, and each domain's pairs but those its adapter alone learns."""
    pairs = list(DEMO_GENERAL)
    for domain, records in DEMO_QA.items():
        pairs.extend(pair for index, pair in enumerate(records) if index not in DEMO_ADAPTER_ONLY[domain])
    return pairs


def build_demo_base(out_dir: Path) -> Path:
    """Write the demo base (config, safetensors weights, tokenizer with chat template) to ``out_dir``: a random
    Llama, then warmed up on :func:`warmup_pairs` (seeded, so the same on every run of one machine)."""
    import logging

    from transformers.utils import logging as hf_logging

    from .tinymodels import build_llama

    hf_logging.disable_progress_bar()  # one tiny shard: a progress bar is noise here
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel; changes no result

    build_llama(out_dir, texts=demo_texts(), **DEMO_MODEL)
    _warm_up(out_dir, warmup_pairs(), **DEMO_WARMUP)
    return out_dir


def _warm_up(model_dir: Path, pairs: list[tuple[str, str]], *, steps: float, lr: float, seed: float) -> None:
    """Full fine-tuning of the model in ``model_dir`` on chat records of ``pairs`` (loss on the answers, packed
    rows as clara's training packs them), saved in place. Plain AdamW with a linear decay and clipped gradients;
    every random draw comes from ``seed``, and the global random state is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training.data import PackedCollator, PackedDataset, Tokenize, TokenizedExample, pack, parse_record

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenize = Tokenize(tokenizer)
    examples = []
    for line, (question, answer) in enumerate(pairs, start=1):
        ids, labels = tokenize(parse_record(_chat_record(question, answer), "warm-up", line), "warm-up")
        examples.append(TokenizedExample(line=line, input_ids=ids, labels=labels, truncated=False))
    rows = PackedDataset(pack(examples, 128))
    collate = PackedCollator(tokenizer.pad_token_id)
    total = int(steps)
    saved = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        order = torch.Generator().manual_seed(int(seed))
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
        model.train()
        for _step in range(total):
            picked = torch.randperm(len(rows), generator=order).tolist()[:4]
            loss = model(**collate([rows[i] for i in picked]), use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    finally:
        torch.random.set_rng_state(saved)
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)


def _chat_record(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_demo_datasets(data_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Write ``<domain>.jsonl`` (chat records) and ``<domain>.dev.jsonl`` per domain; returns the paths."""
    data_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[Path, Path]] = {}
    for domain, pairs in DEMO_QA.items():
        train = data_dir / f"{domain}.jsonl"
        dev = data_dir / f"{domain}.dev.jsonl"
        train.write_text(
            "".join(json.dumps(_chat_record(q, a), ensure_ascii=False) + "\n" for q, a in pairs),
            encoding="utf-8",
        )
        dev.write_text(
            "".join(json.dumps(_chat_record(q, a), ensure_ascii=False) + "\n" for q, a in DEMO_DEV[domain]),
            encoding="utf-8",
        )
        written[domain] = (train, dev)
    return written


def demo_questions() -> dict[str, str]:
    """The question the quickstart asks for each domain."""
    return {domain: pairs[0][0] for domain, pairs in DEMO_QA.items()}


def demo_answer(domain: str) -> str:
    return DEMO_QA[domain][0][1]


# ----------------------------------------------------------------------------------------------------------
# The quickstart, step by step (later issues append steps: export)
# ----------------------------------------------------------------------------------------------------------

DEMO_BASE_NAME = "demo-llama"


@attrs.define
class Quickstart:
    """What the quickstart made, for the steps that follow (and for tests)."""

    workspace: Workspace
    base: BaseRecord | None = None
    datasets: dict[str, tuple[Path, Path]] = attrs.field(factory=dict)
    adapters: dict[str, AdapterRecord] = attrs.field(factory=dict)
    answers: dict[str, dict[str, str]] = attrs.field(factory=dict)
    served: list[dict[str, Any]] = attrs.field(factory=list)
    evaluation: dict[str, dict[str, float]] = attrs.field(factory=dict)  # model -> domain -> ppl
    composite: AdapterRecord | None = None
    composite_answers: dict[str, str] = attrs.field(factory=dict)  # domain -> the composite's answer
    kept: dict[str, float | None] = attrs.field(factory=dict)  # domain -> kept fraction of the ppl gain
    export: dict[str, Any] | None = None  # the registered export entry ('clara export ollama')
    routed: dict[str, Any] = attrs.field(factory=dict)  # the "auto" answer: adapter_id, score, text


def step_workspace(root: Path, echo: Callable[[str], None]) -> Quickstart:
    workspace, created = Workspace.init(root)
    echo(f"1. Workspace {workspace.root} ({'created' if created else 'already there'})")
    return Quickstart(workspace=workspace)


def step_base(state: Quickstart, echo: Callable[[str], None]) -> None:
    workspace = state.workspace
    folder = workspace.base_dir / DEMO_BASE_NAME
    with Registry.open(workspace.registry_path) as registry:
        record = registry.base_for_path(folder) if folder.exists() else None
        if record is None:
            if not folder.exists():
                with workspace.staging("demo-base") as staging:
                    build_demo_base(staging / "model")
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    (staging / "model").rename(folder)
            record = registry.add_base(folder, name=DEMO_BASE_NAME, workspace=workspace)
            echo(
                f"2. Built the demo base '{record.name}' offline in {workspace.relative(folder)} "
                f"(Llama architecture, tokenizer trained here, random weights warmed up on general and background "
                f"demo text; {human_size(record.size_bytes)})"
            )
        else:
            echo(f"2. Demo base '{record.name}' is already registered")
    state.base = record


def step_datasets(state: Quickstart, echo: Callable[[str], None]) -> None:
    state.datasets = write_demo_datasets(state.workspace.root / "data")
    for domain, (train, _dev) in state.datasets.items():
        echo(
            f"3. Wrote {state.workspace.relative(train)} ({len(DEMO_QA[domain])} German questions and answers) "
            f"and its dev set"
        )


def step_train(
    state: Quickstart,
    plugins: PluginManager,
    echo: Callable[[str], None],
    *,
    method: str,
    steps: int,
    progress: bool,
) -> None:
    """Train each domain's adapter; a rerun after an interruption goes on by itself: an adapter already
    trained with the same inputs is reused, an interrupted run continues from its checkpoint."""
    from .training import TrainConfig, train_adapter
    from .training.config import run_key
    from .training.loop import TrainingInterrupted, complete_checkpoints
    from .training.plan import plan_run

    assert state.base is not None
    for domain, (train, dev) in state.datasets.items():
        config = TrainConfig(
            base=str(state.base.path),
            domains=[domain],
            method=method,
            dataset=train,
            dev=dev,
            rank=16,
            dropout=0.0,
            batch_size=4,
            max_steps=steps,
            lr=3e-3,
            max_seq_len=128,
            seed=0,
            license="apache-2.0",
            save_steps=max(1, steps // 4),
        )
        plan = plan_run(attrs.evolve(config), state.workspace, plugins, register=True, world_size=1)
        with Registry.open(state.workspace.registry_path) as registry:
            done = [
                record
                for record in registry.list_adapters()
                if record.training_config and run_key(record.training_config) == plan.key
            ]
        if done:
            state.adapters[domain] = done[-1]
            echo(f"4. {domain}: '{done[-1].id}' was already trained with these inputs; reusing it")
            continue
        checkpoints = complete_checkpoints(plan.run_dir)
        config.resume = bool(checkpoints)
        if checkpoints:
            echo(
                f"4. Continuing the interrupted {method} training for {domain} from step {checkpoints[-1][0]} ..."
            )
        else:
            echo(f"4. Training a {method} adapter for {domain} ({steps} step{'s' if steps != 1 else ''}) ...")
        try:
            result = train_adapter(
                config, state.workspace, plugins, echo=lambda line: echo("   " + line), show_progress=progress
            )
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(
                f"quickstart interrupted while training the {domain} adapter; nothing half-made was registered. "
                "Run the same command again to continue where it stopped"
            ) from exc
        except ClaraError as exc:  # the quickstart has no --resume: a rerun continues by itself
            if "with --resume" not in exc.message:
                raise
            raise type(exc)(exc.message.replace("with --resume", "again")) from exc
        assert result.record is not None
        state.adapters[domain] = result.record


def generate_answers(
    base_path: Path, adapters: dict[str, Path], questions: dict[str, str], max_new_tokens: int = 40
) -> dict[str, dict[str, str]]:
    """Greedy answers to each question from the base alone and from each adapter (one base load)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    names = list(adapters)
    for index, name in enumerate(names):
        if index == 0:
            model = PeftModel.from_pretrained(model, str(adapters[name]), adapter_name=name)
        else:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()

    def answer(question: str) -> str:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return " ".join(str(text).split())

    answers: dict[str, dict[str, str]] = {}
    for domain, question in questions.items():
        row: dict[str, str] = {}
        if names:
            with model.disable_adapter():
                row["base"] = answer(question)
        else:
            row["base"] = answer(question)
        for name in names:
            model.set_adapter(name)
            row[name] = answer(question)
        answers[domain] = row
    return answers


def step_compare(state: Quickstart, echo: Callable[[str], None]) -> None:
    assert state.base is not None
    adapters = {record.id: record.path for record in state.adapters.values()}
    questions = demo_questions()
    state.answers = generate_answers(state.base.path, adapters, questions)
    echo("5. Each domain's question, answered by the base and by each adapter:")
    width = max(len(name) for name in ["base", *adapters])
    for domain, question in questions.items():
        echo("")
        echo(f"   [{domain}] {question}")
        echo(f"   {'expected'.ljust(width)}  {demo_answer(domain)}")
        for name, text in state.answers[domain].items():
            echo(f"   {name.ljust(width)}  {text or '(nothing)'}")
    echo("")
    for record in state.adapters.values():
        if "ppl_dev" in record.metrics:
            echo(
                f"   {record.id}: ppl_dev {record.metrics['ppl_dev']:.2f} on its dev set "
                f"(base: {record.metrics.get('ppl_dev_base', float('nan')):.2f})"
            )


def step_serve(state: Quickstart, echo: Callable[[str], None], *, engine: str | None = None) -> None:
    """Serve the base once with both adapters hot-swapped in on first use, and ask each domain's question."""
    from .serving.demo import serve_and_query

    questions = demo_questions()
    queries = [
        (questions[domain], record.id) for domain, record in state.adapters.items() if domain in questions
    ]
    if not queries:
        return
    echo("")
    echo("6. Serving: one base, the adapters hot-swapped in on first request, the requests batched together:")
    served = serve_and_query(
        state.workspace.root,
        queries,
        engine=engine,
        max_tokens=40,
        chat=True,
        echo=lambda line: echo("   " + line),
    )
    state.served = served
    for domain, record in state.adapters.items():
        answer = next(a for a in served if a["adapter_id"] == record.id)
        text = " ".join(str(answer["text"]).split())
        same = state.answers.get(domain, {}).get(record.id)
        note = "same as in step 5" if same == text else "differs from step 5"
        echo(
            f"   [{domain}] {record.id} answered in {answer['seconds']:.1f} s ({note}): {text or '(nothing)'}"
        )


def clara_command() -> str:
    """How to run clara again, as the user can type it: ``clara`` when that is on PATH and is this clara,
    else the path of the running executable (``.venv/bin/clara`` after the README's install), else
    ``python -m clara_core.cli`` with this interpreter."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name.startswith("clara") and argv0.is_file() and os.access(argv0, os.X_OK):
        on_path = shutil.which(argv0.name)
        if on_path is not None and Path(on_path).resolve() == argv0.resolve():
            return argv0.name
        return shlex.quote(_shown(argv0.absolute()))
    return f"{shlex.quote(_shown(Path(sys.executable)))} -m clara_core.cli"


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it (``.venv/bin/clara``), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def step_eval(state: Quickstart, echo: Callable[[str], None]) -> None:
    """Both adapters and the base on both domains' dev sets ('clara eval matrix'), recorded in the registry."""
    from .evaluation import runner

    if not state.adapters:
        return
    echo("")
    echo("7. Evaluation: perplexity of each adapter and the base on each domain's dev set (lower is better):")
    sets = [(domain, dev) for domain, (_train, dev) in state.datasets.items()]
    ids = [record.id for record in state.adapters.values()]
    with Registry.open(state.workspace.registry_path) as registry:
        names, domains, rows = runner.matrix(
            workspace=state.workspace,
            registry=registry,
            ids=ids,
            sets=sets,
            base_too=True,
            options=runner.Options(progress=False),
            say=lambda line: None,
        )
        report = runner.record(
            state.workspace, registry, rows, command="eval matrix", extra={"domains": domains}
        )
    table = runner.matrix_table(names, domains, rows, "ppl")
    width = max(len(n) for n in names)
    echo("   " + " " * width + "".join(f"  {d:>14}" for d in domains))
    for cells in table:
        echo("   " + cells[0].ljust(width) + "".join(f"  {c:>14}" for c in cells[1:]))
    state.evaluation = {
        n: {r.details["domain"]: r.metrics["ppl"] for r in rows if r.target == n} for n in names
    }
    echo(f"   (* best per column; recorded in the registry and {state.workspace.relative(report)})")


#: How the quickstart combines its adapters: each delta weighted 0.7. Measured on demo bases of four seeds (this
#: one is seed 0), both word-for-word answers stayed in the composite for 3 of 4 at 0.7, for 2 at 1.0 (both
#: added) and for 1 at 0.5 (each halved): the deltas still overlap a little.
COMPOSITE_WEIGHT = 0.7


def step_composite(state: Quickstart, plugins: PluginManager, echo: Callable[[str], None]) -> None:
    """Both adapters combined into one composite, each delta weighted 0.7 ('clara composite build --strategy
    weighted --check'), asked both domains' questions, next to each domain's own adapter; and what it keeps of
    each adapter's perplexity gain."""
    from .composites import CompositeRequest, build_composite
    from .composites import check as composite_check
    from .evaluation.runner import Options

    if len(state.adapters) < 2:
        return
    assert state.base is not None
    records = list(state.adapters.values())
    weights = [COMPOSITE_WEIGHT] * len(records)
    echo("")
    echo(
        f"8. Composite: the adapters combined into one, weights {' '.join(f'{w:g}' for w in weights)} "
        "(clara composite build --strategy weighted --check);"
    )
    echo(
        "   why 0.7: on this demo, halving each delta (0.5) or adding both (1.0) loses one domain's answer more "
        "often; 0.7 keeps both:"
    )
    request = CompositeRequest(adapter_ids=[r.id for r in records], strategy="weighted", weights=weights)
    result = build_composite(request, state.workspace, plugins)
    record = result.record
    state.composite = record
    where = state.workspace.relative(record.path)
    if result.existed:
        echo(f"   '{record.id}' was already built from these adapters ({where})")
    else:
        exact = "exact" if result.max_error == 0.0 else f"max relative error {result.max_error:.2e}"
        echo(f"   Registered '{record.id}' at {where} (rank {record.rank}, {exact})")
    questions = demo_questions()
    answers = generate_answers(state.base.path, {record.id: record.path}, questions)
    width = max(len(name) for name in ["expected", record.id, *(r.id for r in records)])
    for domain, question in questions.items():
        echo("")
        echo(f"   [{domain}] {question}")
        echo(f"   {'expected'.ljust(width)}  {demo_answer(domain)}")
        own = state.adapters.get(domain)
        if own is not None and own.id in state.answers.get(domain, {}):
            echo(f"   {own.id.ljust(width)}  {state.answers[domain][own.id] or '(nothing)'}")
        state.composite_answers[domain] = answers[domain][record.id]
        echo(f"   {record.id.ljust(width)}  {answers[domain][record.id] or '(nothing)'}")
    sets = composite_check.plan(records, state.workspace, lambda line: echo("   " + line))
    with Registry.open(state.workspace.registry_path) as registry:
        kept, _report = composite_check.run_check(
            workspace=state.workspace,
            registry=registry,
            composite_id=record.id,
            sets=sets,
            options=Options(progress=False),
            say=lambda line: None,
        )
    echo("")
    echo(
        "   Perplexity on each adapter's dev set, and how much of the adapter's gain over the base it keeps:"
    )
    for item in kept:
        state.kept[item.domain] = item.kept
        share = "n/a" if item.kept is None else f"{100 * item.kept:.0f}%"
        echo(
            f"   [{item.domain}] base {item.ppl_base:.2f}, {item.component_id} {item.ppl_component:.2f}, "
            f"composite {item.ppl_composite:.2f}: keeps {share}"
        )


def step_export(state: Quickstart, plugins: PluginManager, echo: Callable[[str], None]) -> None:
    """The first adapter exported for Ollama ('clara export ollama'): GGUF base, GGUF LoRA adapter, Modelfile,
    verified against transformers; skipped with one line where clara-plugin-gguf or llama-cpp-python is missing."""
    import importlib.util

    from .exports import run_export
    from .plugins import install_hint

    if not state.adapters:
        return
    record = next(iter(state.adapters.values()))
    echo("")
    echo(f"9. Export for Ollama and llama.cpp (clara export ollama {record.id}):")
    if "ollama" not in plugins.exporters():
        echo(f"   skipped: the 'ollama' exporter is not installed; {install_hint('clara-plugin-gguf')}")
        return
    missing = [name for name in ("gguf", "llama_cpp") if importlib.util.find_spec(name) is None]
    if missing:
        echo(
            f"   skipped: {' and '.join(missing)} not installed ({install_hint('clara-plugin-gguf')}; "
            "llama-cpp-python compiles llama.cpp once, about 5 minutes)"
        )
        return
    with Registry.open(state.workspace.registry_path) as registry:
        done = registry.get_export(record.id)
    if done is not None:
        state.export = done
        echo(f"   '{record.id}' was exported already: {done['path']}")
        return
    outcome = run_export(state.workspace, plugins, "ollama", record.id, echo=lambda _line: None)
    state.export = outcome.entry
    verification = outcome.entry["details"].get("verification") or {}
    for item in outcome.entry["files"]:
        echo(f"   {state.workspace.relative(outcome.path)}/{item['path']}  {human_size(item['size_bytes'])}")
    if verification:
        echo(
            f"   verified with llama.cpp: max |logit difference| {verification.get('max_abs_diff', float('nan')):.2e}"
            f", top-1 agrees at {100 * verification.get('top1_agreement', 0):.0f}% of the positions"
        )
    if outcome.result.message:
        echo(f"   {outcome.result.message}")


#: The router the quickstart fits: on the demo base (random weights) the embedding router's whitened token
#: embeddings route 25 of the 28 demo questions (training and dev) to their domain; the keyword router, with
#: words learned from 14 questions per domain, routes 9.
DEMO_ROUTER = "embedding"


def step_route(
    state: Quickstart,
    plugins: PluginManager,
    echo: Callable[[str], None],
    *,
    serve: bool = True,
    engine: str | None = None,
) -> None:
    """Fit a router on the domain adapters' training data (their ``dataset_ref``), then answer one demo
    question through ``"auto"``: the server picks the adapter (with ``serve=False``: only the decision)."""
    from .routing import fit_router, load_router, local_embedder, route_prompt

    if len(state.adapters) < 2:
        return
    ids = [record.id for record in state.adapters.values()]
    domain, question = next(iter(demo_questions().items()))
    fit_router(state.workspace, plugins, DEMO_ROUTER, adapter_ids=ids)
    echo("")
    echo(
        f"10. Routing: router '{DEMO_ROUTER}' fitted on {' and '.join(ids)} (their training data); "
        f'"{question}" ({domain}):'
    )
    if not serve:
        loaded = load_router(state.workspace, plugins, DEMO_ROUTER)
        decision, _ = route_prompt(loaded, question, local_embedder(loaded.base))
        state.routed = {"adapter_id": decision.adapter_id, "score": decision.score, "text": None}
        echo(f"   routed to {decision.adapter_id or 'the base'} (score {decision.score:.2f})")
        return
    from .serving.demo import serve_and_query

    answer = serve_and_query(
        state.workspace.root,
        [(question, "auto")],
        engine=engine,
        max_tokens=40,
        chat=True,
        router=DEMO_ROUTER,
        echo=lambda line: echo("   " + line),
    )[0]
    route = answer.get("route") or {}
    text = " ".join(str(answer["text"]).split())
    state.routed = {"adapter_id": answer["adapter_id"], "score": route.get("score"), "text": text}
    score = route.get("score")
    echo(
        f'   "auto" chose {answer["adapter_id"] or "the base"}'
        f"{f' (score {score:.2f})' if isinstance(score, float) else ''} and answered: {text or '(nothing)'}"
    )


def step_next(state: Quickstart, echo: Callable[[str], None]) -> None:
    root = state.workspace.root
    shown = shlex.quote(_shown(root))
    clara = clara_command()
    first = next(iter(state.adapters.values())).id if state.adapters else "ID"
    echo("")
    echo("Done. What to run next:")
    echo(f"  {clara} -w {shown} adapters list                      # the registry")
    echo(f"  {clara} -w {shown} adapters show {first}     # hashes, metrics, dataset_ref, config")
    echo(f"  {clara} -w {shown} adapters verify --rebuild {first}  # retrain and compare checksums")
    echo(f"  {clara} -w {shown} eval {first} --base-too            # perplexity on its dev set, recorded")
    if state.composite is not None:
        echo(f"  {clara} -w {shown} composite show {state.composite.id}  # components, weights, gain kept")
    echo(
        f"  {clara} -w {shown} train --base {DEMO_BASE_NAME} --domain verfahren --method lora --rank 8 "
        "--dataset YOUR.jsonl   # your own data"
    )
    echo(f"  {clara} -w {shown} export ollama {first} --merged --outtype q8_0  # one GGUF for Ollama")
    echo(f"  {clara} -w {shown} --engine llamacpp serve --port 8000  # llama.cpp, adapters hot-swapped")
    echo(f"  {clara} -w {shown} serve --port 8000                   # the HTTP API with hot-swap; then:")
    echo(
        "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{first}", "messages": [{{"role": "user", "content": "Wer setzt die Einkommensteuer fest?"}}], "temperature": 0, "max_tokens": 40}}'"""
    )
    echo(
        f'  {clara} -w {shown} route "Wer bekommt Bürgergeld?"  # which adapter the router picks; '
        f'then serve --router {DEMO_ROUTER} and "model": "auto"'
    )


def run_quickstart(
    root: Path,
    plugins: PluginManager,
    *,
    method: str = "lora",
    steps: int = 300,
    echo: Callable[[str], None] = print,
    progress: bool = False,
    serve: bool = True,
    engine: str | None = None,
) -> Quickstart:
    """The quickstart's steps in order; each later issue adds its own step at the end."""
    plugins.trainer_method(method)  # an uninstalled method fails before anything is built
    state = step_workspace(root, echo)
    step_base(state, echo)
    step_datasets(state, echo)
    step_train(state, plugins, echo, method=method, steps=steps, progress=progress)
    step_compare(state, echo)
    if serve:
        step_serve(state, echo, engine=engine)
    step_eval(state, echo)
    step_composite(state, plugins, echo)
    step_export(state, plugins, echo)
    step_route(state, plugins, echo, serve=serve, engine=engine)
    step_next(state, echo)
    return state
