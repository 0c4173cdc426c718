"""clara serve: one base, many adapters behind one HTTP API (native and OpenAI-compatible)."""

from __future__ import annotations

import ipaddress
import os

import click

from ..errors import ClaraError, InvalidInput


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (any name but ``localhost`` counts as not)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond this machine without an API key (an empty key counts as none)."""
    if api_key or insecure_no_auth or is_loopback(host):
        return
    raise ClaraError(
        f"refusing to listen on {host} without an API key: anyone who reaches it could generate and load "
        "adapters; set --api-key KEY (or CLARA_API_KEY), or pass --insecure-no-auth to serve without one"
    )


def api_key_setting(value: str | None) -> str | None:
    """The API key as the server will compare it, or ``None`` for no key (an empty ``CLARA_API_KEY``).

    A key no client can send is refused here rather than failing every request later: HTTP headers carry
    printable ASCII only, and clients strip the spaces around a header value.
    """
    if value is None or value == "":
        return None
    if value != value.strip():
        raise InvalidInput(
            "the API key (--api-key or CLARA_API_KEY) has spaces or line breaks around it, which no client "
            "can send; remove them"
        )
    if not value.isascii() or not value.isprintable():
        raise InvalidInput(
            "the API key (--api-key or CLARA_API_KEY) must be printable ASCII (letters, digits, punctuation): "
            "HTTP headers carry nothing else; choose another key"
        )
    return value


def _engine_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"engine option {pair!r} must read NAME=VALUE (e.g. -o device=cpu)")
        options[name.strip()] = value
    return options


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any other than loopback needs --api-key (or --insecure-no-auth).",
)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one)."
)
@click.option(
    "--base",
    "base_name",
    metavar="NAME",
    help="Registered base to serve (default: the workspace's only one).",
)
@click.option("--preload", multiple=True, metavar="ID", help="Adapter to load at start (repeatable).")
@click.option(
    "--max-loaded",
    default=8,
    show_default=True,
    type=int,
    help="Adapters loaded at once (slots); a request for another one waits for the least recently used "
    "slot to free, first come first served.",
)
@click.option(
    "--api-key",
    envvar="CLARA_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every route but /health. Prefer the environment variable "
    "CLARA_API_KEY: a key given as --api-key shows in the process list (ps) for every user of the machine. "
    "Printable ASCII without surrounding spaces; an empty key means no key.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve on a non-loopback --host without an API key (every route open to whoever reaches it).",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=int,
    help="Requests held at once (generating or waiting for an adapter slot); more answer 503 at once, "
    "with Retry-After.",
)
@click.option(
    "--queue-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=24 * 3600),
    metavar="SECONDS",
    help="Longest wait for an adapter slot; a longer one answers 503 with Retry-After.",
)
@click.option(
    "--max-body",
    "max_body_bytes",
    default=1 << 20,
    show_default=True,
    type=int,
    help="Largest request body in bytes; larger ones answer 413.",
)
@click.option(
    "--read-timeout",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a client has to send a request's head, and again its body; slower clients are cut off.",
)
@click.option(
    "--log-requests",
    is_flag=True,
    help="Append one JSON line per request to metadata/logs/requests.jsonl.",
)
@click.option(
    "--router",
    "router_name",
    metavar="NAME",
    help="Router for adapter_id/model 'auto', fitted with 'clara router fit --router NAME' (embedding, keyword); "
    "an unfitted or stale router is refused at start.",
)
@click.option(
    "--option",
    "-o",
    "engine_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Engine option, e.g. -o device=cuda -o max_batch_size=64 (transformers: device, dtype, "
    "max_batch_size, threads); an unknown name lists the engine's options.",
)
@click.pass_obj
def serve(
    obj,
    host: str,
    port: int,
    base_name: str | None,
    preload: tuple[str, ...],
    max_loaded: int,
    api_key: str | None,
    insecure_no_auth: bool,
    max_queue: int,
    queue_timeout: float,
    max_body_bytes: int,
    read_timeout: float,
    log_requests: bool,
    router_name: str | None,
    engine_options: tuple[str, ...],
) -> None:
    """Serve the base and its registered adapters over HTTP, with hot-swap.

    Engine from the root option --engine (default: transformers). Endpoints: /health, /adapters,
    /load_adapter, /unload_adapter, /activate_adapter, /generate, /metrics and the OpenAI-compatible /v1/models,
    /v1/completions and /v1/chat/completions, where 'model' is an adapter id or the base's name.
    """
    from ..registry import Registry
    from ..serving.requestlog import JsonlRequestLog
    from ..serving.runner import bind, prepare, run
    from ..serving.state import ServeSettings

    api_key = api_key_setting(api_key)
    check_auth(host, api_key, insecure_no_auth)
    if insecure_no_auth and not api_key and not is_loopback(host):
        click.echo(f"clara: warning: serving on {host} without an API key (--insecure-no-auth)", err=True)
    # CPU inference threads that spin while another process holds the cores slow a shared machine down many
    # times over; sleeping waits cost little (set OMP_WAIT_POLICY yourself to override)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    workspace = obj.workspace()
    with Registry.open(workspace.registry_path) as registry:
        registry.check_integrity()  # a damaged registry.db refuses to serve, rather than answer 500s later
    settings = ServeSettings(
        max_loaded=max_loaded,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        read_timeout=read_timeout,
        router_name=router_name,
        preload=list(dict.fromkeys(preload)),
    )
    engine_name = obj.engine_name or os.environ.get("CLARA_ENGINE") or None
    # check the port first: it is the cheapest error to find, before any model is loaded
    bind(host, port).close()
    state = prepare(
        workspace,
        obj.plugins,
        engine_name=engine_name,
        base_name=base_name,
        settings=settings,
        engine_options=_engine_options(engine_options),
        observers=[JsonlRequestLog(workspace.metadata_dir / "logs" / "requests.jsonl")]
        if log_requests
        else [],
        echo=lambda line: click.echo(line, err=True),
    )
    run(state, host, port, echo=lambda line: click.echo(line, err=True))
