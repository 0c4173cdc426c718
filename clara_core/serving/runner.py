"""Everything ``clara serve`` does: resolve engine, base and router with clear errors, bind the port, build
the app and run it on uvicorn. Errors the user can fix surface before any model is loaded, as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checks import check_adapter_for_base, check_base_unchanged
from ..errors import ClaraError, InvalidInput, first_line
from ..plugins import PluginManager
from ..registry import AdapterRecord, BaseRecord, Registry
from ..types import EngineOptions, Option, OptionValueError, RouterImpl, engine_can_embed
from ..workspace import Workspace
from .app import create_app
from .requestlog import RequestObserver
from .state import ServerState, ServeSettings

DEFAULT_ENGINE = "transformers"


def parse_engine_options(declared: Sequence[Option], given: Mapping[str, str], engine: str) -> dict[str, Any]:
    """Turn ``-o name=value`` pairs into the engine's declared option types, defaults filled in."""
    by_name = {o.name: o for o in declared}
    values: dict[str, Any] = {o.name: o.default for o in declared}
    for raw_name, raw in given.items():
        name = raw_name.strip().replace("-", "_")
        option = by_name.get(name)
        if option is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise InvalidInput(f"engine '{engine}' has no option '{raw_name}'; its options: {known}")
        try:
            values[name] = option.convert(raw, label=f"engine option -o {name}")
        except OptionValueError as exc:
            raise InvalidInput(str(exc)) from None
    return values


def _registry_lookup(
    registry_path: Path,
) -> tuple[Callable[[str], AdapterRecord], Callable[[], list[AdapterRecord]]]:
    """Registry reads that work from any thread (a fresh connection per call; reads are cheap)."""

    def lookup(adapter_id: str) -> AdapterRecord:
        with Registry.open(registry_path) as registry:
            return registry.get_adapter(adapter_id)

    def list_all() -> list[AdapterRecord]:
        with Registry.open(registry_path) as registry:
            return registry.list_adapters()

    return lookup, list_all


def max_rank(adapter: AdapterRecord) -> int:
    """The adapter's largest LoRA rank: ``r``, or a larger per-module ``rank_pattern`` value."""
    config = adapter.peft_config or {}
    pattern = config.get("rank_pattern") or {}
    values = pattern.values() if isinstance(pattern, Mapping) else ()
    return max([int(config.get("r") or adapter.rank or 0), *(int(v) for v in values if isinstance(v, int))])


def load_router(plugins: PluginManager, name: str, workspace: Workspace, base: BaseRecord) -> RouterImpl:
    """The fitted router ``name``, refused (one line naming the refit command) when it is not fitted or was
    fitted for another base or another set of adapters."""
    from ..routing import load_router as load_fitted

    return load_fitted(workspace, plugins, name, base).router


class _ReadMostlyCache:
    """The registry's per-file hash cache for the start-up check of the base: a cache entry that cannot be
    written (read-only registry, full disk) costs a hash next time, never the start."""

    def __init__(self, registry: Registry, on_miss: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.on_miss = on_miss

    def get(self, path: str, size: int, mtime_ns: int) -> str | None:
        cached = self.registry.get(path, size, mtime_ns)
        if cached is None and self.on_miss is not None:
            self.on_miss(path)
        return cached

    def put(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        with contextlib.suppress(sqlite3.Error, ClaraError):
            self.registry.put(path, size, mtime_ns, sha256)


def prepare(
    workspace: Workspace,
    plugins: PluginManager,
    *,
    engine_name: str | None,
    base_name: str | None,
    settings: ServeSettings,
    engine_options: Mapping[str, str] | None = None,
    observers: Sequence[RequestObserver] = (),
    echo: Callable[[str], None] | None = None,
) -> ServerState:
    """Resolve engine, base, router and preloaded adapters; build the engine (not started) and the state.

    The base's files are checked against its registered hash first (``echo`` hears of each file that must be
    hashed because it changed or was never hashed on this machine)."""
    if settings.max_loaded < 1:
        raise InvalidInput(f"--max-loaded must be at least 1, got {settings.max_loaded}")
    if settings.max_queue < 1:
        raise InvalidInput(f"--max-queue must be at least 1, got {settings.max_queue}")
    if not 0 < settings.queue_timeout < float("inf"):
        raise InvalidInput(f"--queue-timeout must be more than 0 seconds, got {settings.queue_timeout:g}")
    engine_name = engine_name or DEFAULT_ENGINE
    registration = plugins.engine(engine_name)
    settings.engine_name = registration.name
    extra = parse_engine_options(registration.options, engine_options or {}, registration.name)
    with Registry.open(workspace.registry_path) as registry:
        base = registry.choose_base(base_name)

        def on_miss(
            path: str,
        ) -> None:  # a changed file, or one never hashed on this machine: it takes a while
            if echo is not None:
                echo(
                    f"clara: hashing {Path(path).name} of base '{base.name}' to check it against the registry ..."
                )

        check_base_unchanged(base, _ReadMostlyCache(registry, on_miss))
        if len(settings.preload) > settings.max_loaded:
            raise InvalidInput(
                f"{len(settings.preload)} adapters to preload but --max-loaded is {settings.max_loaded}"
            )
        for adapter_id in settings.preload:
            check_adapter_for_base(registry.get_adapter(adapter_id), base)
        ranks = [max_rank(a) for a in registry.list_adapters() if a.base_model_hash == base.base_model_hash]
    router = load_router(plugins, settings.router_name, workspace, base) if settings.router_name else None
    engine = registration.create(
        base,
        EngineOptions(
            max_loaded=settings.max_loaded,
            max_queue=settings.max_queue,
            extra=extra,
            max_adapter_rank=max(ranks, default=None),
            cache_dir=workspace.cache_dir,
        ),
    )
    lookup, list_all = _registry_lookup(workspace.registry_path)
    router_embed = None
    if router is not None and router.needs_embeddings and not engine_can_embed(engine):
        from ..routing import local_embedder

        if echo is not None:
            echo(
                f"clara: engine '{registration.name}' cannot embed; the router loads base '{base.name}' once more"
            )
        router_embed = local_embedder(base)
    state = ServerState(
        engine,
        base,
        lookup,
        list_all,
        settings,
        router=router,
        observers=observers,
        router_embed=router_embed,
    )
    # clients see '<workspace>/models/cache/...' (an engine's converted files in /health), never the real root
    state.hide_path(workspace.root, "<workspace>")
    return state


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so that a taken port is a clear error before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ClaraError(
                f"port {port} on {host} is in use (another server?); choose another --port"
            ) from None
        raise ClaraError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(
    state: ServerState,
    sock: socket.socket,
    *,
    log_level: str = "warning",
    on_ready: Callable[[], None] | None = None,
    server_box: list | None = None,
) -> None:
    """Start the engine, preload, then serve on ``sock`` until uvicorn is told to exit."""
    import uvicorn

    app = create_app(state, manage_engine=False)
    from .protocol import protocol_with_head_timeout

    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=30,
        http=protocol_with_head_timeout(state.settings.read_timeout),
    )
    server = uvicorn.Server(config)
    if server_box is not None:
        server_box.append(server)
    try:
        await state.engine.start()
    except ClaraError:
        raise
    except Exception as exc:  # a broken model folder, out of memory, ...: one line, not a traceback
        raise ClaraError(
            f"engine '{state.settings.engine_name}' could not load base '{state.base.name}' "
            f"({state.base.path}): {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        for adapter_id in state.settings.preload:
            await state.adapters.load(adapter_id)
        if on_ready is not None:
            on_ready()
        await server.serve(sockets=[sock])
    finally:
        await state.engine.shutdown()


def run(state: ServerState, host: str, port: int, *, echo: Callable[[str], None] | None = None) -> None:
    """Bind, start and serve in the foreground (``clara serve``)."""
    sock = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    out = echo or (lambda line: print(line, file=sys.stderr))

    def ready() -> None:
        actual_port = sock.getsockname()[1]
        out(
            f"clara: serving base '{state.base.name}' with engine '{state.settings.engine_name}' on "
            f"http://{shown_host}:{actual_port} (loaded: {', '.join(state.adapters.loaded) or 'none'}; "
            "Ctrl-C stops)"
        )

    try:
        asyncio.run(serve(state, sock, on_ready=ready))
    finally:
        sock.close()


class BackgroundServer:
    """A real server on 127.0.0.1 in a thread of this process (tests and demos): ``with`` it, use ``url``."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self._ready = threading.Event()
        self._servers: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="clara-serve", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(serve(self.state, self.sock, on_ready=self._ready.set, server_box=self._servers))
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 120) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        for _ in range(int(timeout * 100)):  # uvicorn flips 'started' right after on_ready
            if self._servers and self._servers[0].started:
                break
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        if self._servers:
            self._servers[0].should_exit = True
        self._thread.join(60)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
