"""What plugins register, and the interfaces their implementations fill in.

A hook implementation calls ``register(...)`` with one of the registration classes below
(:class:`TrainerMethod`, :class:`MergeStrategy`, :class:`Engine`, :class:`Exporter`, :class:`Router`): a
normalised ``name``, a ``factory`` that builds the implementation, a one-line ``description`` and the
``options`` the implementation accepts beyond the ones clara itself defines. Options declared here reach the
implementation as a plain mapping, so the core never needs to know a plugin's options (the ``ties`` strategy's
``--density`` is one).

The factory is called lazily, only when a command needs the implementation, so that importing a plugin stays
cheap: heavy libraries (torch, transformers, peft, vllm, llama_cpp) are imported inside the factory or the
implementation's methods, never at a plugin module's top. Each registration builds its implementation through
its typed ``create()``, which checks that the factory returned an instance of the kind's interface
(:class:`TrainerMethodImpl`, :class:`MergeStrategyImpl`, :class:`EngineImpl`, :class:`ExporterImpl`,
:class:`RouterImpl`) and otherwise raises a :class:`~clara_core.errors.PluginError` naming the plugin.

**Request objects.** Every call into an implementation that may need more information later takes one
request object, not a list of positional arguments: :class:`GenerationRequest` for engines,
:class:`ModuleMergeRequest` and :class:`MergeCheckRequest` for merge strategies, :class:`ExportRequest` for
exporters, :class:`RouterFitRequest` and :class:`RouteRequest` for routers (:class:`AdapterSpec` and
:class:`EngineOptions` play the same part for trainer methods and engine factories). Requests are built by
the core with keyword arguments; new fields get defaults, so old plugins keep working when a request grows:
a plugin reads the fields it knows and ignores the rest. Plugins never build requests except in their tests.

Plugins import all of this from :mod:`clara_core.plugin_api`, the one module whose names are promised to them.
This module imports nothing heavy either; tensors and models appear in annotations only.
"""

from __future__ import annotations

import abc
import builtins
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from .errors import ClaraError, PluginError, first_line

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .records import AdapterRecord, BaseRecord

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def normalise_name(value: str) -> str:
    """Lower-case, trimmed, spaces to ``-``; must then match ``[a-z0-9][a-z0-9_.-]*``."""
    if not isinstance(value, str):
        raise TypeError(f"a plugin registration name must be a string, got {type(value).__name__}")
    name = value.strip().lower().replace(" ", "-")
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid registration name {value!r}: use letters, digits, '_', '.' and '-'")
    return name


_OPTION_TYPES = (str, int, float, bool)
#: How a message names each option type ("must be a whole number", never "must be a int").
_TYPE_WORDS: dict[builtins.type, str] = {
    str: "text",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class OptionValueError(ValueError):
    """A value an :class:`Option` refuses; the message is one line naming the option and what it allows."""


@attrs.frozen
class Option:
    """An option an implementation accepts; it parses, checks and converts its own values.

    ``name`` is the Python name (``majority_sign``); the flag is ``--majority-sign`` and the engine form
    ``-o majority_sign=VALUE``. The value reaches the implementation in its ``options`` mapping under ``name``,
    converted to ``type``. ``choices`` are held in ``type`` too (``Option("bits", int, 4, choices=(4, 8))``;
    strings such as ``("4", "8")`` are converted). Every command builds its flags with :meth:`click_option`
    and converts values with :meth:`convert`, so there is one parser for all of them.
    """

    name: str = attrs.field(converter=lambda v: normalise_name(v).replace("-", "_").replace(".", "_"))
    type: builtins.type = attrs.field(default=str)
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = attrs.field(
        default=None, converter=lambda v: None if v is None else tuple(v)
    )
    #: The flag may be repeated (``--layer 1 --layer 3``); the implementation gets a list.
    multiple: bool = False

    @type.validator
    def _check_type(self, _attribute: attrs.Attribute, value: builtins.type) -> None:
        if value not in _OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of str, int, float, bool")

    def __attrs_post_init__(self) -> None:
        if self.choices is not None:
            if not self.choices:
                raise ValueError(f"option {self.name!r}: choices must not be empty")
            try:
                typed = tuple(self._parse(c, self.flag) for c in self.choices)
            except OptionValueError as exc:
                raise ValueError(f"option {self.name!r}: choices must be {self.type_word}: {exc}") from None
            object.__setattr__(self, "choices", typed)
        if self.default is not None:
            try:
                object.__setattr__(self, "default", self.convert(self.default))
            except OptionValueError as exc:
                raise ValueError(f"option {self.name!r}: its default is refused: {exc}") from None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def type_word(self) -> str:
        """What a value must be, in words: ``a whole number``, ``a number``, ``true or false``, ``text``."""
        return _TYPE_WORDS[self.type]

    def allowed(self) -> str:
        """What the option accepts, for messages and help: ``4 or 8``, ``a whole number``."""
        if self.choices:
            shown = [str(c) for c in self.choices]
            return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
        return self.type_word

    def convert(self, raw: Any, label: str | None = None) -> Any:
        """``raw`` (a string from a command line, or an already typed value) as ``type``, checked against
        ``choices``. A refused value raises :class:`OptionValueError` with one line that starts with ``label``
        (default: the flag) and says what is allowed."""
        label = self.flag if label is None else label
        if self.multiple and isinstance(raw, (list, tuple)):  # a repeated flag: each value on its own
            return [self._convert_one(item, label) for item in raw]
        return self._convert_one(raw, label)

    def _convert_one(self, raw: Any, label: str) -> Any:
        value = self._parse(raw, label)
        if self.choices is not None and value not in self.choices:
            raise OptionValueError(f"{label} must be {self.allowed()}, got {_show(raw)}".lstrip())
        return value

    def _parse(self, raw: Any, label: str) -> Any:
        wanted = f"{label} must be {self.type_word}, got {_show(raw)}".lstrip()
        if self.type is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise OptionValueError(
                f"{label} must be true or false (also 1/0, yes/no, on/off), got {_show(raw)}".lstrip()
            )
        if isinstance(raw, bool):  # True is an int to Python, but not a value of a number option
            raise OptionValueError(wanted)
        if self.type is str:
            if not isinstance(raw, str):
                raise OptionValueError(wanted)
            return raw
        if self.type is int:
            if isinstance(raw, int):
                return raw
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            if isinstance(raw, str):
                try:
                    return int(raw.strip())
                except ValueError:
                    pass
            raise OptionValueError(wanted)
        # float
        if isinstance(raw, (int, float)):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise OptionValueError(wanted) from None
        else:
            raise OptionValueError(wanted)
        if not math.isfinite(value):
            raise OptionValueError(f"{label} must be a finite number, got {_show(raw)}".lstrip())
        return value

    def click_type(self) -> Any:
        """A ``click.ParamType`` that converts with :meth:`convert`; a refused value is click's usual one-line
        usage error (exit 2)."""
        import click

        option = self

        class OptionType(click.ParamType):
            name = option.type.__name__ if option.type is not str else "text"

            def convert(self, value: Any, param: Any, ctx: Any) -> Any:
                try:
                    # click names the flag itself: "Invalid value for '--bits': must be 4 or 8, got 5"
                    return option.convert(value, label="")
                except OptionValueError as exc:
                    self.fail(str(exc), param, ctx)

            def get_metavar(self, param: Any, ctx: Any = None) -> str | None:
                if option.choices:
                    return "[" + "|".join(str(c) for c in option.choices) + "]"
                return None

        return OptionType()

    def click_option(self, dest: str | None = None, *, help_prefix: str = "") -> Any:
        """The ``click.Option`` for this option: ``--name VALUE``, or ``--name/--no-name`` for a bool.

        The default is left to the implementation's options mapping (click's default is ``None``, meaning "not
        given"), and shown in the help.
        """
        import click

        default_text = f" (default: {_show(self.default)})" if self.default is not None else ""
        help_text = help_prefix + (self.help or "") + default_text
        decls = [f"{self.flag}/--no-{self.flag[2:]}" if self.type is bool else self.flag]
        if dest is not None:
            decls.append(dest)
        if self.type is bool:
            return click.Option(decls, default=None, help=help_text)
        if self.multiple:  # not given: click's empty tuple, which the commands treat as "not given"
            return click.Option(decls, type=self.click_type(), multiple=True, help=help_text + " Repeatable.")
        return click.Option(decls, type=self.click_type(), default=None, help=help_text)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and " " not in value else repr(value)
    return str(value)


def _options(value: Sequence[Option]) -> tuple[Option, ...]:
    options = tuple(value)
    for option in options:
        if not isinstance(option, Option):
            raise TypeError(f"options must be clara_core.types.Option instances, got {option!r}")
    names = [o.name for o in options]
    if len(names) != len(set(names)):
        raise ValueError(f"duplicate option names in {names}")
    return options


@attrs.frozen
class Registration:
    """Common shape of everything a hook registers."""

    #: What a user types (``--method dora``, ``--engine vllm``), normalised to lower case.
    name: str = attrs.field(converter=normalise_name)
    #: Called by :meth:`create` (with no arguments, or with the documented ones for engines) to build the
    #: implementation.
    factory: Callable[..., Any] = attrs.field(validator=attrs.validators.is_callable())
    #: One line for ``clara plugins`` and ``--help``.
    description: str = ""
    #: Implementation-specific options; the core turns them into flags and passes their values through.
    options: tuple[Option, ...] = attrs.field(default=(), converter=_options)
    #: Who registered it (``plugin 'lora' (clara-plugin-lora 0.1.0)``), filled in by the plugin manager when
    #: it collects the registration; used in error messages. Plugins leave it empty.
    registered_by: str = attrs.field(default="", kw_only=True, eq=False)

    #: Human name of the kind, used in messages ("unknown engine 'x'").
    kind: ClassVar[str] = "plugin"

    def _build(self, expected: type[Any], *args: Any) -> Any:
        """Call the factory and check that it built an ``expected``; name the plugin when it did not."""
        origin = self.registered_by or "a plugin"
        try:
            impl = self.factory(*args)
        except ClaraError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{self.kind} '{self.name}' from {origin} could not be built: {type(exc).__name__}: "
                f"{first_line(exc)}; report it to the plugin's authors"
            ) from exc
        if not isinstance(impl, expected):
            raise PluginError(
                f"{self.kind} '{self.name}' from {origin} is broken: its factory returned "
                f"{type(impl).__module__}.{type(impl).__qualname__}, not an instance of "
                f"clara_core.plugin_api.{expected.__name__}; report it to the plugin's authors"
            )
        return impl


@attrs.frozen
class TrainerMethod(Registration):
    """A way to train an adapter: how the base is loaded and how the PEFT config is built."""

    kind: ClassVar[str] = "trainer method"

    def create(self) -> TrainerMethodImpl:
        """``factory()``, checked to be a :class:`TrainerMethodImpl`."""
        return self._build(TrainerMethodImpl)


@attrs.frozen
class MergeStrategy(Registration):
    """A way to combine several adapters into one composite."""

    kind: ClassVar[str] = "merge strategy"

    def create(self) -> MergeStrategyImpl:
        """``factory()``, checked to be a :class:`MergeStrategyImpl`."""
        return self._build(MergeStrategyImpl)


@attrs.frozen
class Engine(Registration):
    """A serving engine: loads the base once and serves many adapters behind clara's HTTP API."""

    kind: ClassVar[str] = "engine"

    def create(self, base: BaseRecord, options: EngineOptions) -> EngineImpl:
        """``factory(base, options)``, checked to be an :class:`EngineImpl` (the base is not loaded yet)."""
        return self._build(EngineImpl, base, options)


@attrs.frozen
class Exporter(Registration):
    """An export target (``clara export <name> ID``), for example ``ollama``."""

    kind: ClassVar[str] = "exporter"

    def create(self) -> ExporterImpl:
        """``factory()``, checked to be an :class:`ExporterImpl`."""
        return self._build(ExporterImpl)


@attrs.frozen
class Router(Registration):
    """A router: picks the adapter for a prompt."""

    kind: ClassVar[str] = "router"

    def create(self) -> RouterImpl:
        """``factory()``, checked to be a :class:`RouterImpl`."""
        return self._build(RouterImpl)


# --------------------------------------------------------------------------------------------------------------
# Trainer methods
# --------------------------------------------------------------------------------------------------------------


@attrs.define
class AdapterSpec:
    """The adapter-shaping options every trainer method takes (``--rank``, ``--alpha``, ...).

    ``target_modules`` of ``None`` means: every linear projection of the architecture. ``options`` holds the
    method's own declared options by name.
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    seed: int = 0
    options: dict[str, Any] = attrs.field(factory=dict)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)


class TrainerMethodImpl(abc.ABC):
    """What a trainer method provides. The training loop, datasets, checkpoints and registration are shared.

    A method decides how the base is loaded (full precision, 4-bit, 8-bit, ...) and how the PEFT config is
    built (LoRA, DoRA, ...). Everything else is clara's job.
    """

    #: Python distributions whose versions are recorded with the adapter (``torch``, ``transformers`` and
    #: ``peft`` are always recorded).
    recorded_packages: tuple[str, ...] = ()

    def check(self, spec: AdapterSpec) -> None:  # noqa: B027 - optional hook with a sensible default
        """Refuse unusable options before any work starts (raise :class:`clara_core.errors.ClaraError`)."""

    @abc.abstractmethod
    def load_base(
        self, base_path: Path, spec: AdapterSpec, *, dtype: Any = None, device_map: Any = None
    ) -> Any:
        """Load the base model from a Hugging Face folder, ready for PEFT (a ``PreTrainedModel``)."""

    @abc.abstractmethod
    def peft_config(self, model: Any, spec: AdapterSpec, target_modules: list[str]) -> Any:
        """Build the ``peft.PeftConfig`` for this method; ``target_modules`` is already resolved."""

    def prepare(self, model: Any, spec: AdapterSpec) -> Any:
        """Adjust the loaded base before PEFT wraps it (``prepare_model_for_kbit_training`` for k-bit bases)."""
        return model


# --------------------------------------------------------------------------------------------------------------
# Merge strategies
# --------------------------------------------------------------------------------------------------------------


@attrs.define
class ModuleDelta:
    """One component adapter's contribution to one module of the base, with the user's weight for it.

    The LoRA delta is ``scaling * lora_B @ lora_A`` (``scaling`` is alpha/r, or alpha/sqrt(r) for rsLoRA, with
    the adapter's ``rank_pattern``/``alpha_pattern`` already applied). For DoRA ``magnitude`` holds the learned
    magnitude vector and the effective weight is ``magnitude * (W + delta) / ||W + delta||`` (row norms), so
    the delta depends on the weight it is applied to: :meth:`dense` needs it. ``weight`` is the user's weight
    for this component (``--weights``; 1.0 where none were given).
    """

    adapter_id: str
    lora_A: Any  # torch.Tensor [r, in]
    lora_B: Any  # torch.Tensor [out, r]
    scaling: float
    magnitude: Any = None  # torch.Tensor [out] for DoRA, else None
    weight: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def dense(self, base_weight: Any = None) -> Any:
        """The unweighted dense weight delta ``[out, in]`` this component adds to ``base_weight``.

        LoRA: ``scaling * B @ A`` (``base_weight`` unused). DoRA: ``m * (W + s B A) / ||W + s B A|| - W`` with
        ``W = base_weight`` (required), the row norms taken as PEFT does.
        """
        delta = self.scaling * (self.lora_B @ self.lora_A)
        if self.magnitude is None:
            return delta
        if base_weight is None:
            raise ValueError(f"the DoRA delta of '{self.adapter_id}' needs the base weight it is applied to")
        combined = base_weight + delta
        norm = combined.norm(p=2, dim=1, keepdim=True)
        return (self.magnitude.reshape(-1, 1) / norm) * combined - base_weight


@attrs.define
class MergedModule:
    """A strategy's answer for one module: low-rank factors, or a dense weight delta.

    With ``lora_A``/``lora_B`` the composite stores them at scaling 1, exactly (rank = rows of ``lora_A``;
    ``clara composite build --rank R`` may still compress them by truncated SVD). With ``dense_delta``, clara
    compresses it by truncated SVD to the chosen rank and records the relative error. With ``magnitude`` the
    result is DoRA-shaped: the merged weight is ``magnitude * (W + delta) / ||W + delta||`` (row norms) with
    ``delta`` the factors' product or ``dense_delta``; clara stores the exact difference to ``W`` by SVD.
    """

    lora_A: Any = None
    lora_B: Any = None
    dense_delta: Any = None
    magnitude: Any = None

    def __attrs_post_init__(self) -> None:
        has_factors = self.lora_A is not None or self.lora_B is not None
        if has_factors == (self.dense_delta is not None):
            raise ValueError("a MergedModule holds either lora_A and lora_B, or dense_delta")
        if has_factors and (self.lora_A is None or self.lora_B is None):
            raise ValueError("a MergedModule with factors needs both lora_A and lora_B")


@attrs.frozen(kw_only=True)
class MergeCheckRequest:
    """What :meth:`MergeStrategyImpl.check` gets before any tensor is read.

    ``adapter_ids`` and ``weights``: the components and the user's weight for each, in the order given
    (``weights`` is ``None`` where the user gave no ``--weights``); ``options``: the strategy's own declared
    options by name, defaults filled in; ``seed``: for randomised strategies. New fields get defaults (see the
    module docstring).
    """

    weights: Sequence[float] | None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    adapter_ids: Sequence[str] = ()
    seed: int = 0


@attrs.frozen(kw_only=True)
class ModuleMergeRequest:
    """What :meth:`MergeStrategyImpl.merge_module` gets for one target module of the base.

    ``module``: the module's name in the base (``model.layers.0.self_attn.q_proj``); ``deltas``: each
    component's :class:`ModuleDelta` that touches the module, in the components' order, each with its weight
    (the union of the components' modules is covered: a module only one component touches gets one delta);
    ``base_weight``: the module's dense base weight ``[out, in]``, loaded only where the strategy sets
    :attr:`MergeStrategyImpl.needs_base_weight` or a delta is DoRA (else ``None``); ``options``: the strategy's
    own declared options by name; ``seed``: a seed for randomised strategies, derived from ``--seed`` and the
    module name (so the result does not depend on the order modules are visited). New fields get defaults.
    """

    module: str
    deltas: Sequence[ModuleDelta]
    base_weight: Any = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    seed: int = 0

    @property
    def weights(self) -> tuple[float, ...]:
        """The components' weights, in the order of :attr:`deltas`."""
        return tuple(d.weight for d in self.deltas)


class MergeStrategyImpl(abc.ABC):
    """What a merge strategy provides.

    :meth:`merge_module` is called once per target module with a :class:`ModuleMergeRequest`; :meth:`check`
    once before, with a :class:`MergeCheckRequest`.
    """

    #: True where the order of the components changes the result (``sequential``).
    order_sensitive: bool = False
    #: True where :meth:`merge_module` needs ``request.base_weight`` for every module (it costs reading the
    #: base's weights); DoRA components get it regardless.
    needs_base_weight: bool = False
    #: True where the strategy uses the user's ``--weights`` (``weighted``); ``additive`` refuses them.
    takes_weights: bool = True

    def check(self, request: MergeCheckRequest) -> None:  # noqa: B027 - optional hook with a sensible default
        """Refuse unusable weights or options before any tensor is read (raise a ``ClaraError``)."""

    @abc.abstractmethod
    def merge_module(self, request: ModuleMergeRequest) -> MergedModule:
        """Combine the components' deltas for one module."""


# --------------------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------------------


@attrs.define
class GenerationRequest:
    """One request to an engine, already validated by the server.

    ``adapter_id`` of ``None`` means the base model alone; otherwise the adapter is loaded (the server calls
    :meth:`EngineImpl.load_adapter` before it hands the request over, and keeps it loaded until the request
    ends). ``temperature`` 0 means greedy decoding. ``stop`` strings end the answer and are not part of it.
    ``seed`` makes sampling reproducible per request. ``ignore_eos`` keeps generating past the end-of-sequence
    token up to ``max_tokens`` (benchmarks; vLLM's ``SamplingParams.ignore_eos``). ``add_special_tokens`` is
    False for prompts rendered by :meth:`EngineImpl.render_chat`, whose template already holds them.
    """

    prompt: str
    adapter_id: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = attrs.field(factory=list)
    seed: int | None = None
    request_id: str = ""
    ignore_eos: bool = False
    add_special_tokens: bool = True


@attrs.define
class GenerationChunk:
    """A piece of a streamed answer: ``text`` is new text since the previous chunk (may be empty).

    ``prompt_tokens`` and ``completion_tokens`` are running totals. The last chunk has ``finish_reason`` set:
    ``"stop"`` (end-of-sequence token or a stop string), ``"length"`` (``max_tokens`` reached) or ``"abort"``.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@attrs.define
class EngineCapabilities:
    """What an engine can do, reported in ``/health``.

    ``mixed_adapter_batching``: one forward pass can serve requests on different adapters. Where it is false
    (llama.cpp), requests on different adapters take turns. ``max_model_len``: prompt plus answer tokens the
    engine can hold per request (``None``: unknown); the server refuses longer requests with 422 before they
    reach the engine. Engines set it on the instance in :meth:`EngineImpl.start` once the base is known.
    """

    mixed_adapter_batching: bool
    streaming: bool = True
    max_model_len: int | None = None
    notes: str = ""


@attrs.define
class EngineOptions:
    """What ``clara serve`` hands an engine's factory besides the base.

    ``max_loaded``: adapters the server keeps loaded at once (it evicts the least recently used idle one
    before loading another, so an engine never sees more); ``max_queue``: requests the server admits at once.
    ``extra`` holds the values of the options declared on the :class:`Engine` registration (``clara serve
    -o name=value``), already converted to their declared types, defaults filled in. ``max_adapter_rank``:
    the largest LoRA rank (``r`` or any ``rank_pattern`` value) among the registry's adapters for the served
    base, ``None`` when none is registered; engines that size buffers ahead of time (vLLM's
    ``max_lora_rank``) read it instead of looking for a registry themselves. New fields get defaults.
    """

    max_loaded: int = 8
    max_queue: int = 64
    #: Engine-specific options declared on the registration (``max_lora_rank`` for vLLM, ...).
    extra: dict[str, Any] = attrs.field(factory=dict)
    max_adapter_rank: int | None = None
    #: The workspace folder for artefacts an engine derives from registered files and may reuse across runs
    #: (``models/cache/``: converted GGUF bases and adapters, keyed by their source hashes), ``None`` where
    #: there is no workspace. Engines write there atomically (a temporary name, then a rename).
    cache_dir: Path | None = None


class EngineImpl(abc.ABC):
    """What a serving engine provides. Built by ``Engine.create(base, options)`` with a ``BaseRecord`` and
    :class:`EngineOptions`; the base is loaded once in :meth:`start` and never again for the engine's life.

    The server (``clara_core.serving``) owns everything engines share: the registry lookup by id, the base
    hash and checksum checks (done before :meth:`load_adapter` is called), the LRU of loaded adapters, the
    request queue, limits, metrics and the HTTP API. An engine only loads weights and generates.

    Everything is called from the server's event loop; the coroutines must not block it (run blocking work in
    a thread or a worker of the engine's own). :meth:`generate` is an async generator: the server closes it
    (``aclose()``) when the client goes away, and the engine must then free the request's slot at once.
    Concurrent :meth:`generate` calls are batched together by the engine as it can (see
    :class:`EngineCapabilities`). Errors the user can act on are :class:`clara_core.errors.ClaraError`.
    """

    capabilities: EngineCapabilities = EngineCapabilities(mixed_adapter_batching=False)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the base model (once) and start any workers."""

    @abc.abstractmethod
    async def load_adapter(self, adapter: AdapterRecord) -> None:
        """Make the adapter (its folder is ``adapter.path``) available under ``adapter.id``, without
        reloading the base. Raise :class:`clara_core.errors.ClaraError` for adapters this engine cannot
        serve (the message says what to do).

        Loads and unloads of *different* adapters may run at the same time (the server queues requests for
        adapter slots and does not serialise the engine); the same adapter is never loaded and unloaded at
        once, and an evicted adapter is loaded again only after its unload has returned."""

    @abc.abstractmethod
    async def unload_adapter(self, adapter_id: str) -> None:
        """Free the adapter's memory. The server only unloads adapters no request is using."""

    @abc.abstractmethod
    def loaded_adapters(self) -> list[str]:
        """Ids of the adapters currently loaded."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to one request (an async generator); the last chunk has ``finish_reason``."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """Turn OpenAI-style chat messages into a prompt with the base tokenizer's chat template."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` for the base tokenizer (for usage and limits)."""
        return len(text.split())

    async def embed(self, texts: Sequence[str], *, layer: int | None = None) -> list[list[float]]:
        """Optional: one vector per text from the loaded *base* (no adapter), the mean of one layer's hidden
        states over the text's tokens. ``layer`` counts as transformers' ``hidden_states`` do: ``0`` the token
        embeddings, ``k`` the output of the k-th decoder layer, ``None`` or ``-1`` the last hidden states; for
        a layer before the last, only the layers up to it should run (routing then costs a fraction of a
        forward pass). A layer the base does not have raises :class:`clara_core.errors.InvalidInput`.
        Routers that need embeddings use it in the server instead of loading a second copy of the model; the
        vectors must equal the CLI's (``clara_core.routing.embed``), on which routers are fitted. An engine
        without it leaves it out (see :func:`engine_can_embed`), and callers check :func:`engine_can_embed`
        first, so this default is reached only by a caller's mistake."""
        raise PluginError(
            f"the engine {type(self).__module__}.{type(self).__qualname__} cannot embed texts; check "
            "engine_can_embed(engine) first and load the base for embeddings where it is false"
        )

    def health(self) -> dict[str, Any]:
        """Engine-specific details for ``/health`` (device, batch sizes, base loads, ...)."""
        return {}

    async def shutdown(self) -> None:  # noqa: B027 - optional
        """Release the model and any background workers."""


def check_prompt_fits(prompt_ids: Sequence[int], request: GenerationRequest, limit: int | None) -> None:
    """What every engine checks of a tokenised prompt before generating: that it is not empty, and that it and
    ``request.max_tokens`` fit the model's context of ``limit`` tokens (``None``: no limit known). Raises
    :class:`clara_core.errors.InvalidInput` (HTTP 400) with one line."""
    from .errors import InvalidInput

    if not prompt_ids:
        raise InvalidInput("the prompt is empty; send some text to complete")
    if limit is not None and len(prompt_ids) + request.max_tokens > limit:
        raise InvalidInput(
            f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )


def engine_can_embed(engine: EngineImpl) -> bool:
    """Whether ``engine`` implements :meth:`EngineImpl.embed`."""
    return type(engine).embed is not EngineImpl.embed


# --------------------------------------------------------------------------------------------------------------
# Exporters
# --------------------------------------------------------------------------------------------------------------


@attrs.define
class ExportResult:
    """What an export wrote: every file, inside ``request.out_dir`` (absolute, or relative to it; clara records
    each with its sha256 in the registry), ``details`` to record beside them (verification numbers, errors),
    and a ``message`` for the user (``ollama create ...``)."""

    files: list[Path]
    details: dict[str, Any] = attrs.field(factory=dict)
    message: str = ""


@attrs.frozen(kw_only=True)
class ExportRequest:
    """What :meth:`ExporterImpl.export` gets: the registered ``adapter`` and its ``base``, the ``out_dir`` to
    write into, and the exporter's own declared ``options`` by name. New fields get defaults."""

    adapter: AdapterRecord
    base: BaseRecord
    out_dir: Path
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: The export's name (``--name``, else one clara derives from the adapter id), for file names and tags.
    name: str = ""
    #: The workspace folder for artefacts reused across exports and engines (``models/cache/``: a converted
    #: base is cached there per ``base_model_hash`` and output type), ``None`` where there is no workspace.
    cache_dir: Path | None = None
    #: Progress lines for the user (clara prints them to stderr); long steps should report through it.
    echo: Callable[[str], None] = attrs.field(default=lambda _line: None)


class ExporterImpl(abc.ABC):
    """What an exporter provides. Writes into ``request.out_dir`` (a fresh temporary folder that clara renames
    into place and registers only when the export returns without error).

    An export that was written but fails its own check raises :class:`clara_core.errors.ExportRejected`: clara
    then keeps the folder aside under a name that says so (``NAME.rejected-<time>``) for inspection and
    registers nothing. Any other error removes the folder."""

    @abc.abstractmethod
    def export(self, request: ExportRequest) -> ExportResult:
        """Write the export files into ``request.out_dir``."""


# --------------------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------------------


class EmbedFn(Protocol):
    """Text embeddings from the base model: one vector per text, the mean of the hidden states at ``layer``
    over its tokens (``0``: the token embeddings, ``k``: after k decoder layers, ``None`` or ``-1``: the last,
    as :meth:`EngineImpl.embed`). The server hands routers the engine's own (its already loaded base); the
    CLI one that loads the base once."""

    def __call__(self, texts: Sequence[str], *, layer: int | None = None) -> list[list[float]]: ...


@attrs.define
class RouteDecision:
    """A router's choice for one prompt: ``adapter_id`` of ``None`` means the base model answers. ``score`` is
    the confidence of the choice (0..1 where the router can say), ``scores`` the score per adapter id."""

    adapter_id: str | None
    score: float
    scores: dict[str, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class RouterFitRequest:
    """What :meth:`RouterImpl.fit` learns from: the registered ``adapters`` to choose among, their ``base``
    and the router's own declared ``options`` by name. New fields get defaults.

    ``examples``: training texts per adapter id (a sample of the adapter's ``dataset_ref`` or of the file
    given with ``--data DOMAIN=FILE``), ``held_out``: more texts per adapter id, not in ``examples``, to fit
    thresholds on. ``keywords``: hand-written patterns (regular expressions) per domain from ``clara router
    keywords``. ``embed``: text embeddings from the base (set when the router's ``needs_embeddings`` is true).
    ``previous``: the folder of the last fitted state of this router, or ``None`` (for caches: a router may
    reuse what it computed for an adapter of the same checksum)."""

    adapters: Sequence[AdapterRecord]
    base: BaseRecord
    options: Mapping[str, Any] = attrs.field(factory=dict)
    examples: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    held_out: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    keywords: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    embed: EmbedFn | None = None
    previous: Path | None = None


@attrs.frozen(kw_only=True)
class RouteRequest:
    """One routing question: ``prompt`` is what the user wrote (the last user message of a chat, not the
    rendered template); ``embed`` as in :class:`RouterFitRequest`. New fields get defaults."""

    prompt: str
    embed: EmbedFn | None = None


class RouterImpl(abc.ABC):
    """What a router provides: fitted on registered adapters, saved beside the registry, used by the server.

    ``state_dir`` is a folder the router owns (under ``metadata/routers/<name>/``); :meth:`save` writes
    everything :meth:`load` needs. clara keeps a manifest beside it (base hash, the adapters' ids and
    checksums, the keywords, the fit time) and refuses a state fitted for another base or another set of
    adapters, so a router only has to fit, save, load and route. Set ``needs_embeddings`` to get ``embed``
    in the requests. :meth:`route` is called from worker threads, never on the server's event loop.
    """

    needs_embeddings: ClassVar[bool] = False

    @abc.abstractmethod
    def fit(self, request: RouterFitRequest) -> None:
        """Learn how to choose among ``request.adapters``."""

    @abc.abstractmethod
    def route(self, request: RouteRequest) -> RouteDecision:
        """Choose the adapter for ``request.prompt``."""

    def route_batch(self, requests: Sequence[RouteRequest]) -> list[RouteDecision]:
        """Choose for many prompts at once (``clara router eval``); the default asks :meth:`route` for each."""
        return [self.route(r) for r in requests]

    @abc.abstractmethod
    def save(self, state_dir: Path) -> None:
        """Persist the fitted state."""

    @abc.abstractmethod
    def load(self, state_dir: Path) -> None:
        """Restore a fitted state written by :meth:`save`."""

    def summary(self) -> str | None:
        """One line on what the fit chose (``clara router fit`` prints it and the manifest keeps it), or
        ``None``."""
        return None


#: The registration classes by hook name, in the order ``clara plugins`` prints them.
REGISTRATION_KINDS: dict[str, type[Registration]] = {
    "register_trainer_methods": TrainerMethod,
    "register_merge_strategies": MergeStrategy,
    "register_engines": Engine,
    "register_exporters": Exporter,
    "register_routers": Router,
}
