"""Which adapters are loaded: registry ids only, checked against the served base, hot-swapped with LRU eviction.

Only ids from the registry are ever loaded (a request can never name a path). Before each load the adapter's
``base_model_hash`` must be the served base's and its files must match ``adapter_checksum``; otherwise a 409
names both hashes and nothing is loaded. Beyond ``max_loaded`` the least recently used adapter that no request
is using is unloaded first; when every loaded adapter is busy the request is refused with 503.

Everything runs on the server's event loop; the counters are changed without an ``await`` in between, so no
request can see an adapter half-acquired.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..checks import check_adapter_for_base
from ..errors import Conflict, NotFound
from ..registry import AdapterRecord, BaseRecord
from ..types import EngineImpl
from .errors import AdapterInUse, AdaptersBusy
from .metrics import Metrics


class AdapterManager:
    def __init__(
        self,
        engine: EngineImpl,
        base: BaseRecord,
        lookup: Callable[[str], AdapterRecord],
        *,
        max_loaded: int,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.base = base
        self.lookup = lookup  # adapter id -> AdapterRecord (raises NotFound / InvalidInput)
        self.max_loaded = max_loaded
        self.metrics = metrics
        self.loaded: OrderedDict[str, AdapterRecord] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.load_seconds: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": adapter_id,
                "domain": record.domain,
                "method": record.method,
                "rank": record.rank,
                "adapter_checksum": record.adapter_checksum,
                "in_use": self.in_use.get(adapter_id, 0),
                "last_used": self.last_used.get(adapter_id),
                "load_seconds": round(self.load_seconds.get(adapter_id, 0.0), 4),
            }
            for adapter_id, record in self.loaded.items()
        ]

    def _touch(self, adapter_id: str) -> None:
        self.loaded.move_to_end(adapter_id)
        self.last_used[adapter_id] = time.time()

    async def load(self, adapter_id: str) -> tuple[AdapterRecord, bool]:
        """Load ``adapter_id`` if it is not loaded; returns its record and whether it was loaded now."""
        async with self._lock:
            return await self._load_locked(adapter_id, reserve=False)

    async def _load_locked(self, adapter_id: str, *, reserve: bool) -> tuple[AdapterRecord, bool]:
        if adapter_id in self.loaded:
            self._touch(adapter_id)
            if reserve:
                self.in_use[adapter_id] = self.in_use.get(adapter_id, 0) + 1
            return self.loaded[adapter_id], False
        record = self.lookup(adapter_id)
        started = time.perf_counter()
        try:
            await asyncio.to_thread(check_adapter_for_base, record, self.base)
        except Conflict:
            self.metrics.refusals.labels(adapter_id).inc()
            raise
        while len(self.loaded) >= self.max_loaded:
            victim = next((a for a in self.loaded if self.in_use.get(a, 0) == 0), None)
            if victim is None:
                raise AdaptersBusy(
                    f"cannot load '{adapter_id}': all {self.max_loaded} loaded adapters are serving requests "
                    f"(--max-loaded {self.max_loaded}); retry shortly or start the server with a higher "
                    "--max-loaded"
                )
            del self.loaded[victim]
            try:
                await self.engine.unload_adapter(victim)
            except BaseException:
                self.loaded[victim] = self.lookup(victim)
                raise
            self.metrics.evictions.labels(victim).inc()
        await self.engine.load_adapter(record)
        elapsed = time.perf_counter() - started
        self.loaded[adapter_id] = record
        self.load_seconds[adapter_id] = elapsed
        self._touch(adapter_id)
        if reserve:
            self.in_use[adapter_id] = self.in_use.get(adapter_id, 0) + 1
        self.metrics.loads.labels(adapter_id).inc()
        self.metrics.load_seconds.observe(elapsed)
        self.metrics.loaded.set(len(self.loaded))
        return record, True

    async def unload(self, adapter_id: str) -> None:
        async with self._lock:
            if adapter_id not in self.loaded:
                self.lookup(adapter_id)  # 404 for ids the registry does not know
                raise NotFound(f"adapter '{adapter_id}' is not loaded")
            busy = self.in_use.get(adapter_id, 0)
            if busy:
                raise AdapterInUse(
                    f"adapter '{adapter_id}' is serving {busy} request(s); unload it when they are done"
                )
            del self.loaded[adapter_id]
            try:
                await self.engine.unload_adapter(adapter_id)
            except BaseException:
                self.loaded[adapter_id] = self.lookup(adapter_id)
                raise
            self.metrics.unloads.labels(adapter_id).inc()
            self.metrics.loaded.set(len(self.loaded))

    @asynccontextmanager
    async def use(self, adapter_id: str | None) -> AsyncIterator[AdapterRecord | None]:
        """Hold ``adapter_id`` loaded (hot-swapping it in if needed) for the duration of a request."""
        if adapter_id is None:
            yield None
            return
        if adapter_id in self.loaded:  # no await before the count is taken: eviction cannot interleave
            record = self.loaded[adapter_id]
            self._touch(adapter_id)
            self.in_use[adapter_id] = self.in_use.get(adapter_id, 0) + 1
        else:
            async with self._lock:
                record, _ = await self._load_locked(adapter_id, reserve=True)
        try:
            yield record
        finally:
            self.in_use[adapter_id] = max(0, self.in_use.get(adapter_id, 1) - 1)
            self.last_used[adapter_id] = time.time()
