"""One way to declare and parse options: :class:`clara_core.types.Option` converts, checks and builds its own
flag, and ``clara train`` flags, ``train_adapter`` and ``clara serve -o NAME=VALUE`` all go through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_core import hookimpl
from clara_core.errors import ClaraError
from clara_core.plugins import PluginManager
from clara_core.serving.app import ServeSettings
from clara_core.serving.runner import prepare
from clara_core.training.run import method_options
from clara_core.types import Engine, EngineImpl, Option, OptionValueError, TrainerMethod, TrainerMethodImpl
from clara_core.workspace import Workspace


def test_convert_types_and_typed_choices() -> None:
    bits = Option("bits", int, "4", "bits", choices=("4", "8"))
    assert bits.choices == (4, 8) and bits.default == 4  # held in the option's type, not as strings
    assert bits.convert("8") == 8 and bits.convert(8) == 8
    assert Option("lr", float).convert("1e-3") == pytest.approx(1e-3)
    flag = Option("fast", bool)
    assert [flag.convert(v) for v in ("yes", "OFF", "1", "false", True)] == [True, False, True, False, True]
    assert Option("name", str, choices=["a", "b"]).convert("b") == "b"
    with pytest.raises(ValueError, match="choices must be a whole number"):
        Option("bad", int, choices=("x",))
    with pytest.raises(ValueError, match="its default is refused: --bad must be 4 or 8, got 5"):
        Option("bad", int, 5, choices=(4, 8))


@pytest.mark.parametrize(
    ("option", "raw", "message"),
    [
        (Option("bits", int, 4, choices=(4, 8)), "5", "--bits must be 4 or 8, got 5"),
        (Option("bits", int, 4, choices=(4, 8)), "four", "--bits must be a whole number, got four"),
        (Option("bits", int), True, "--bits must be a whole number, got true"),
        (Option("scale", float), "x", "--scale must be a number, got x"),
        (Option("scale", float), "nan", "--scale must be a finite number, got nan"),
        (Option("fast", bool), "maybe", "--fast must be true or false (also 1/0, yes/no, on/off), got maybe"),
        (Option("kind", str, choices=("nf4", "fp4")), "", "--kind must be nf4 or fp4, got ''"),
    ],
)
def test_bad_values_are_one_line_naming_the_option_and_what_is_allowed(
    option: Option, raw: object, message: str
) -> None:
    with pytest.raises(OptionValueError) as caught:
        option.convert(raw)
    assert str(caught.value) == message
    assert "a int" not in str(caught.value)


def test_method_options_convert_through_the_declared_option() -> None:
    registration = TrainerMethod(
        "m", object, options=[Option("bits", int, 4, choices=(4, 8)), Option("fast", bool, False)]
    )
    assert method_options(registration, {"bits": "8", "fast": "on"}) == {"bits": 8, "fast": True}
    assert method_options(registration, {}) == {"bits": 4, "fast": False}
    with pytest.raises(ClaraError, match=r"^--bits must be 4 or 8, got 3 \(method 'm'\)$"):
        method_options(registration, {"bits": 3})


class _Method(TrainerMethodImpl):
    def load_base(self, base_path, spec, *, dtype=None, device_map=None):  # pragma: no cover - not reached
        raise AssertionError("options are checked before any model is loaded")

    def peft_config(self, model, spec, target_modules):  # pragma: no cover - not reached
        raise AssertionError


class _Engine(EngineImpl):
    """Never started: the test only looks at the options the server built it with."""

    def __init__(self, base, options) -> None:
        self.options = options

    async def start(self) -> None:  # pragma: no cover - not started
        raise AssertionError

    async def load_adapter(self, adapter) -> None:  # pragma: no cover
        raise AssertionError

    async def unload_adapter(self, adapter_id: str) -> None:  # pragma: no cover
        raise AssertionError

    def loaded_adapters(self) -> list[str]:  # pragma: no cover
        return []

    def generate(self, request):  # pragma: no cover
        raise AssertionError

    def render_chat(self, messages) -> str:  # pragma: no cover
        raise AssertionError


class _Plugin:
    @hookimpl
    def register_trainer_methods(self, register: Callable) -> None:
        register(
            TrainerMethod(
                "typed",
                _Method,
                "a method with an int option that has choices",
                options=[Option("bits", int, 4, "4 or 8 bits", choices=("4", "8"))],
            )
        )

    @hookimpl
    def register_engines(self, register: Callable) -> None:
        register(
            Engine(
                "typed",
                _Engine,
                "an engine with typed options",
                options=[
                    Option("bits", int, 4, choices=(4, 8)),
                    Option("eager", bool, False),
                    Option("scale", float, 1.0),
                ],
            )
        )


def test_train_flag_of_an_int_option_with_choices(
    run_cli: Callable[..., Result], plugin_manager: PluginManager, tmp_path: Path
) -> None:
    plugin_manager.register(_Plugin(), name="typed")
    helped = run_cli("train", "--help")
    assert "--bits [4|8]" in helped.output and "[typed] 4 or 8 bits (default: 4)" in helped.output
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "a"}\n')
    common = ("train", "--base", "nope", "--domain", "x", "--method", "typed", "--dataset", str(dataset))
    bad = run_cli(*common, "--bits", "5")
    assert bad.exit_code == 2, bad.output
    assert bad.output.strip().splitlines()[-1] == "Error: Invalid value for '--bits': must be 4 or 8, got 5"
    word = run_cli(*common, "--bits", "vier")
    assert word.exit_code == 2
    assert word.output.strip().splitlines()[-1].endswith("must be a whole number, got vier")
    # A good value passes the parser and reaches the run, which then fails on the missing base (one line, 1).
    good = run_cli(*common, "--bits", "8")
    assert good.exit_code == 1 and "Invalid value" not in good.output


def test_serve_engine_options_convert_through_option(
    run_cli: Callable[..., Result], workspace_with_base: Workspace, plugin_manager: PluginManager
) -> None:
    plugin_manager.register(_Plugin(), name="typed")
    state = prepare(
        workspace_with_base,
        plugin_manager,
        engine_name="typed",
        base_name=None,
        settings=ServeSettings(),
        engine_options={"bits": "8", "eager": "yes", "scale": "0.5"},
    )
    assert state.engine.options.extra == {"bits": 8, "eager": True, "scale": 0.5}
    for pair, expected in [
        ("bits=5", "engine option -o bits must be 4 or 8, got 5"),
        ("eager=vielleicht", "engine option -o eager must be true or false"),
        ("scale=x", "engine option -o scale must be a number, got x"),
    ]:
        result = run_cli("--engine", "typed", "serve", "--port", "0", "-o", pair)
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and expected in last and "Traceback" not in result.output


def test_click_option_converts_and_repeats() -> None:
    import click
    from click.testing import CliRunner

    seen: dict = {}
    layers = Option("layers", int, multiple=True, choices=(1, 2, 3), help="layers to adapt")
    bits = Option("bits", int, 4, choices=(4, 8))

    @click.command(params=[layers.click_option("layers"), bits.click_option("bits")])
    def command(**values):
        seen.update(values)

    assert CliRunner().invoke(command, ["--layers", "1", "--layers", "3", "--bits", "8"]).exit_code == 0
    assert seen == {"layers": (1, 3), "bits": 8}
    assert layers.convert(["2", 3]) == [2, 3]
    bad = CliRunner().invoke(command, ["--layers", "4"])
    assert bad.exit_code == 2
    assert (
        bad.output.strip().splitlines()[-1] == "Error: Invalid value for '--layers': must be 1, 2 or 3, got 4"
    )
