"""The plugin API: every hook clara calls.

A plugin is a module with functions marked ``@hookimpl`` (from :mod:`clara_core.plugin_api`) whose names match
the hooks below, made known to clara by an entry point in the group ``clara``::

    # pyproject.toml of clara-plugin-example
    [project.entry-points.clara]
    example = "clara_plugin_example"

Each ``register_<things>`` hook receives a ``register`` callback; call it once per thing with an instance of
the matching registration class. clara validates what is registered (names, duplicates across plugins) and
builds implementations lazily through the registration's ``create()``, which checks that the ``factory``
returned the kind's interface and names the plugin when it did not.

A plugin imports from :mod:`clara_core.plugin_api` only (every name below comes from there) and pins the core
versions it works with in its ``pyproject.toml`` (``"clara-core>=0.1,<0.2"``). pluggy passes a hook
implementation only the arguments it names, so hooks can gain arguments later without breaking existing
plugins; the interfaces' methods take one request object each, whose new fields get defaults, for the same
reason. Keep the plugin module's imports light: import torch, transformers, peft, vllm or llama_cpp inside the
factory or the implementation's methods, so that ``clara --help`` stays fast.

Every ``Example::`` below runs in ``tests/test_plugin_api.py``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("clara")
hookimpl = pluggy.HookimplMarker("clara")


@hookspec
def register_trainer_methods(register: Any) -> None:
    """Register trainer methods (``clara train --method NAME``).

    Call ``register(TrainerMethod(name, factory, description, options))``; ``factory()`` returns a
    :class:`~clara_core.plugin_api.TrainerMethodImpl`. The shared training loop calls the implementation's
    ``load_base``, ``prepare`` and ``peft_config``; declared ``options`` become flags of ``clara train`` and
    reach the implementation in ``spec.options``.

    Example::

        from clara_core.plugin_api import Option, TrainerMethod, TrainerMethodImpl, hookimpl

        class MyLora(TrainerMethodImpl):
            def load_base(self, base_path, spec, *, dtype=None, device_map=None):
                from transformers import AutoModelForCausalLM
                return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, device_map=device_map)

            def peft_config(self, model, spec, target_modules):
                from peft import LoraConfig
                return LoraConfig(r=spec.rank, lora_alpha=spec.effective_alpha,
                                  lora_dropout=spec.options["dropout"],
                                  target_modules=target_modules, task_type="CAUSAL_LM")

        @hookimpl
        def register_trainer_methods(register):
            register(TrainerMethod("mylora", MyLora, "LoRA, my way",
                                   options=[Option("dropout", float, 0.1, "dropout of the LoRA layers")]))
    """


@hookspec
def register_merge_strategies(register: Any) -> None:
    """Register merge strategies (``clara composite build --strategy NAME``).

    Call ``register(MergeStrategy(name, factory, description, options))``; ``factory()`` returns a
    :class:`~clara_core.plugin_api.MergeStrategyImpl` whose ``merge_module(request)`` combines the components'
    deltas of one module. The request (a :class:`~clara_core.plugin_api.ModuleMergeRequest`) holds ``module``,
    ``deltas`` (one :class:`~clara_core.plugin_api.ModuleDelta` per component touching the module: ``lora_A``,
    ``lora_B``, ``scaling``, ``magnitude`` for DoRA, the user's ``weight``, and ``dense(base_weight)``),
    ``base_weight`` (only for strategies with ``needs_base_weight = True``, or where a component is DoRA),
    ``options`` and ``seed``. Return a :class:`~clara_core.plugin_api.MergedModule`: factors (stored exactly)
    or a ``dense_delta`` (clara compresses it by SVD and records the error), optionally with a DoRA
    ``magnitude``. Declared ``options`` become flags of ``clara composite build`` (``--density 0.5``) and
    reach the strategy as ``request.options``, so the core never needs to know them.

    Example::

        from clara_core.plugin_api import MergedModule, MergeStrategy, MergeStrategyImpl, Option, hookimpl

        class Mean(MergeStrategyImpl):
            def merge_module(self, request):
                deltas = request.deltas
                dense = sum(d.weight * d.dense(request.base_weight) for d in deltas) / len(deltas)
                return MergedModule(dense_delta=dense * request.options["gain"])

        @hookimpl
        def register_merge_strategies(register):
            register(MergeStrategy("mean", Mean, "weighted average of the deltas",
                                   options=[Option("gain", float, 1.0, "scale of the result")]))
    """


@hookspec
def register_engines(register: Any) -> None:
    """Register serving engines (``clara --engine NAME serve``).

    Call ``register(Engine(name, factory, description, options))``; ``factory(base, options)`` gets the
    served :class:`~clara_core.plugin_api.BaseRecord` and :class:`~clara_core.plugin_api.EngineOptions` and
    returns a :class:`~clara_core.plugin_api.EngineImpl`. The engine loads the base once in ``start()``, then loads and unloads
    adapters at run time and streams generations; clara's HTTP server, checks, queueing and metrics are shared.

    Example::

        from clara_core.plugin_api import Engine, hookimpl

        def make_engine(base, options):
            from clara_plugin_myengine.engine import MyEngine  # heavy imports live there
            return MyEngine(base, options)

        @hookimpl
        def register_engines(register):
            register(Engine("myengine", make_engine, "my inference server"))
    """


@hookspec
def register_exporters(register: Any) -> None:
    """Register export targets (``clara export NAME ADAPTER_ID``).

    Call ``register(Exporter(name, factory, description, options))``; ``factory()`` returns a
    :class:`~clara_core.plugin_api.ExporterImpl` whose ``export(request)`` (an
    :class:`~clara_core.plugin_api.ExportRequest`: ``adapter``, ``base``, ``out_dir``, ``options``) writes files
    into a temporary ``request.out_dir`` that clara moves into place and records in the registry only on
    success.

    Example::

        import shutil
        from clara_core.plugin_api import Exporter, ExporterImpl, ExportResult, hookimpl

        class CopyExporter(ExporterImpl):
            def export(self, request):
                target = request.out_dir / "adapter_model.safetensors"
                shutil.copy(request.adapter.path / "adapter_model.safetensors", target)
                return ExportResult(files=[target], message=f"copied to {target}")

        @hookimpl
        def register_exporters(register):
            register(Exporter("copy", CopyExporter, "plain copy of the adapter weights"))
    """


@hookspec
def register_routers(register: Any) -> None:
    """Register routers (``clara route --router NAME``, ``clara serve --router NAME``).

    Call ``register(Router(name, factory, description, options))``; ``factory()`` returns a
    :class:`~clara_core.plugin_api.RouterImpl` that can be fitted on registered adapters
    (``fit(request)``, a :class:`~clara_core.plugin_api.RouterFitRequest`: ``adapters``, ``base``,
    ``options``), saved, loaded and asked to route a prompt (``route(request)``, a
    :class:`~clara_core.plugin_api.RouteRequest`) to an adapter (or to the base with ``adapter_id=None``).
    The fit request carries sampled training texts per adapter (``examples``, ``held_out``), the keywords of
    ``clara router keywords`` and, for a router with ``needs_embeddings = True``, ``embed`` (the base model's
    mean-pooled hidden states, ``embed(texts, layer=k)`` for the hidden states after k decoder layers, ``0`` the
    token embeddings, ``None`` the last; in the server the engine's loaded base computes them). ``route_batch`` routes
    many prompts at once (its default loops). clara keeps the manifest (base hash, adapter ids and checksums)
    and refuses a stale state, so a router only fits, saves, loads and routes.

    Example::

        import json
        from clara_core.plugin_api import RouteDecision, Router, RouterImpl, hookimpl

        class FirstWord(RouterImpl):
            def fit(self, request):
                self.by_domain = {a.domain[0]: a.id for a in request.adapters}
            def route(self, request):
                words = request.prompt.split()
                adapter = self.by_domain.get(words[0].lower()) if words else None
                return RouteDecision(adapter, 1.0 if adapter else 0.0)
            def save(self, state_dir):
                (state_dir / "map.json").write_text(json.dumps(self.by_domain))
            def load(self, state_dir):
                self.by_domain = json.loads((state_dir / "map.json").read_text())

        @hookimpl
        def register_routers(register):
            register(Router("first-word", FirstWord, "route by the prompt's first word"))
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands or command groups to the ``clara`` CLI (a ``click.Group``).

    Example::

        import click
        from clara_core.plugin_api import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("adapter_id")
            def hello(adapter_id):
                "Say hello to an adapter."
                click.echo(f"hello {adapter_id}")
    """
