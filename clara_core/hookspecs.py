"""The plugin API: every hook clara calls.

A plugin is a module with functions marked ``@clara_core.hookimpl`` whose names match the hooks below, made
known to clara by an entry point in the group ``clara``::

    # pyproject.toml of clara-plugin-example
    [project.entry-points.clara]
    example = "clara_plugin_example"

Each ``register_<things>`` hook receives a ``register`` callback; call it once per thing with an instance of
the matching class from :mod:`clara_core.types`. clara validates what is registered (names, duplicates across
plugins) and builds implementations lazily through their ``factory``.

pluggy passes a hook implementation only the arguments it names, so hooks can gain arguments later without
breaking existing plugins. Keep the plugin module's imports light: import torch, transformers, peft, vllm or
llama_cpp inside the factory or the implementation's methods, so that ``clara --help`` stays fast.
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
    :class:`clara_core.types.TrainerMethodImpl`. The shared training loop calls the implementation's
    ``load_base``, ``prepare`` and ``peft_config``; declared ``options`` become flags of ``clara train`` and
    reach the implementation in ``spec.options``.

    Example::

        from clara_core import hookimpl
        from clara_core.types import Option, TrainerMethod, TrainerMethodImpl

        class IA3Like(TrainerMethodImpl):
            def load_base(self, base_path, spec, *, dtype=None, device_map=None):
                from transformers import AutoModelForCausalLM
                return AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=dtype)

            def peft_config(self, model, spec, target_modules):
                from peft import LoraConfig
                return LoraConfig(r=spec.rank, lora_alpha=spec.effective_alpha,
                                  target_modules=target_modules, task_type="CAUSAL_LM")

        @hookimpl
        def register_trainer_methods(register):
            register(TrainerMethod("mylora", IA3Like, "LoRA, my way",
                                   options=[Option("init_scale", float, 1.0, "scale of B at init")]))
    """


@hookspec
def register_merge_strategies(register: Any) -> None:
    """Register merge strategies (``clara composite build --strategy NAME``).

    Call ``register(MergeStrategy(name, factory, description, options))``; ``factory()`` returns a
    :class:`clara_core.types.MergeStrategyImpl` whose ``merge_module`` combines the components' deltas of one
    module. Declared ``options`` become flags of ``clara composite build`` (``--density 0.5``) and reach
    ``merge_module`` as the ``options`` mapping, so the core never needs to know them.

    Example::

        from clara_core import hookimpl
        from clara_core.types import MergedModule, MergeStrategy, MergeStrategyImpl, Option

        class Mean(MergeStrategyImpl):
            def merge_module(self, module, deltas, weights, base_weight, options):
                dense = sum(d.scaling * (d.lora_B @ d.lora_A) for d in deltas) / len(deltas)
                return MergedModule(dense_delta=dense * options["gain"])

        @hookimpl
        def register_merge_strategies(register):
            register(MergeStrategy("mean", Mean, "average of the deltas",
                                   options=[Option("gain", float, 1.0, "scale of the result")]))
    """


@hookspec
def register_engines(register: Any) -> None:
    """Register serving engines (``clara --engine NAME serve``).

    Call ``register(Engine(name, factory, description, options))``; ``factory(base, options)`` gets the
    served :class:`clara_core.registry.BaseRecord` and :class:`clara_core.types.EngineOptions` and returns a
    :class:`clara_core.types.EngineImpl`. The engine loads the base once in ``start()``, then loads and unloads
    adapters at run time and streams generations; clara's HTTP server, checks, queueing and metrics are shared.

    Example::

        from clara_core import hookimpl
        from clara_core.types import Engine

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
    :class:`clara_core.types.ExporterImpl` whose ``export(adapter, base, out_dir, options)`` writes files into a
    temporary ``out_dir`` that clara moves into place and records in the registry only on success.

    Example::

        import shutil
        from clara_core import hookimpl
        from clara_core.types import Exporter, ExporterImpl, ExportResult

        class CopyExporter(ExporterImpl):
            def export(self, adapter, base, out_dir, options):
                target = out_dir / "adapter_model.safetensors"
                shutil.copy(adapter.path / "adapter_model.safetensors", target)
                return ExportResult(files=[target], message=f"copied to {target}")

        @hookimpl
        def register_exporters(register):
            register(Exporter("copy", CopyExporter, "plain copy of the adapter weights"))
    """


@hookspec
def register_routers(register: Any) -> None:
    """Register routers (``clara route --router NAME``, ``clara serve --router NAME``).

    Call ``register(Router(name, factory, description, options))``; ``factory()`` returns a
    :class:`clara_core.types.RouterImpl` that can be fitted on registered adapters, saved, loaded and asked to
    route a prompt to an adapter (or to the base with ``adapter_id=None``).

    Example::

        from clara_core import hookimpl
        from clara_core.types import RouteDecision, Router, RouterImpl

        class FirstWord(RouterImpl):
            def fit(self, adapters, base, options):
                self.by_domain = {a.domain[0]: a.id for a in adapters}
            def route(self, prompt):
                adapter = self.by_domain.get(prompt.split()[0].lower())
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
        from clara_core import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("adapter_id")
            def hello(adapter_id):
                "Say hello to an adapter."
                click.echo(f"hello {adapter_id}")
    """
