"""clara's HTTP server, shared by every engine: adapters by registry id with hash checks, hot-swap with LRU
eviction, admission and queue limits, API key, metrics, the native and the OpenAI-compatible API.

Modules: :mod:`.app` (the FastAPI app), :mod:`.state` (settings, shared state, the generation path),
:mod:`.adapters` (which adapters are loaded), :mod:`.admission` (queue limits), :mod:`.metrics` (Prometheus),
:mod:`.requestlog` (per-request records, the seam for JSON logs), :mod:`.openai_api`, :mod:`.streaming` (SSE),
:mod:`.runner` (``clara serve``), :mod:`.demo` (start, query, stop). Nothing heavy is imported here.
"""
