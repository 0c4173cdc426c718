"""Which adapters are loaded: registry ids only, checked against the served base, hot-swapped with LRU eviction,
and a fair queue for the slots.

Only ids from the registry are ever loaded (a request can never name a path). Before each load the adapter's
``base_model_hash`` must be the served base's and its files must match ``adapter_checksum``; otherwise a 409
names both hashes and nothing is loaded.

At most ``max_loaded`` adapters are loaded (a *slot* each). A request for a loaded adapter runs at once. A
request for an adapter that is not loaded waits in one first-come-first-served queue until a slot frees:

* a free slot, or the least recently used loaded adapter that no request is using (evicted), goes to the
  adapter whose first waiter came first; every waiter for that adapter proceeds together once it is loaded;
* when every loaded adapter is busy, the oldest waiting adapter *claims* a victim (the least recently used
  one, preferring adapters nobody is waiting for) and that victim *drains*: its running requests finish,
  new requests for it queue behind the claim, so a rarely used adapter is never starved by busy ones;
* requests on the other loaded adapters keep running (and batching) meanwhile: nothing holds a lock while
  waiting. Loads of different adapters may run at once (an engine that loads between decoding steps, like
  the transformers engine, then does several at one step boundary); one adapter id is never loaded and
  unloaded at the same time, and a victim is unloaded before its successor loads, so at most ``max_loaded``
  adapters are ever loaded.

A wait longer than ``queue_timeout`` seconds answers 503 ``queue_timeout`` with ``Retry-After`` (the admission
queue, ``--max-queue``, bounds how many wait). Every wait is observed in ``clara_adapter_queue_wait_seconds``.

Everything runs on the server's event loop; the bookkeeping changes without an ``await`` in between, so no
request can see an adapter half-acquired.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs

from ..checks import check_adapter_for_base
from ..errors import Conflict, NotFound
from ..registry import AdapterRecord, BaseRecord
from ..types import EngineImpl
from .errors import AdapterChanged, AdapterInUse, QueueTimeout
from .metrics import Metrics

#: ``--queue-timeout`` default: seconds a request waits for an adapter slot before 503.
DEFAULT_QUEUE_TIMEOUT = 30.0


@attrs.define(eq=False)
class _Waiter:
    adapter_id: str
    future: asyncio.Future[AdapterRecord]
    since: float


class AdapterManager:
    def __init__(
        self,
        engine: EngineImpl,
        base: BaseRecord,
        lookup: Callable[[str], AdapterRecord],
        *,
        max_loaded: int,
        metrics: Metrics,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.base = base
        self.lookup = lookup  # adapter id -> AdapterRecord (raises NotFound / InvalidInput)
        self.max_loaded = max_loaded
        self.metrics = metrics
        self.queue_timeout = queue_timeout
        self.loaded: OrderedDict[str, AdapterRecord] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.load_seconds: dict[str, float] = {}
        #: adapters being loaded now (each holds a slot), with the adapter evicted for it
        self.loading: dict[str, str | None] = {}
        #: loaded adapters being unloaded on request (each still holds its slot)
        self.unloading: set[str] = set()
        #: adapters evicted for a load, until the engine has unloaded them (not loadable again before), with
        #: their records (put back if the load fails before the unload)
        self.evicting: dict[str, AdapterRecord] = {}
        #: loaded adapter -> the waiting adapter that claimed its slot; it takes no new requests
        self.draining: dict[str, str] = {}
        self.waiters: deque[_Waiter] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: called after every change of the bookkeeping (tests wait on it instead of sleeping)
        self.on_change: Callable[[], None] | None = None

    # -- views ---------------------------------------------------------------------------------------------

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
                "draining": adapter_id in self.draining,
            }
            for adapter_id, record in self.loaded.items()
        ]

    def queue(self) -> dict[str, Any]:
        """What waits for a slot (``/health``)."""
        by_adapter: dict[str, int] = {}
        for waiter in self.waiters:
            by_adapter[waiter.adapter_id] = by_adapter.get(waiter.adapter_id, 0) + 1
        return {
            "waiting": len(self.waiters),
            "waiting_by_adapter": by_adapter,
            "loading": list(self.loading),
            "evicting": sorted(self.evicting),
            "draining": dict(self.draining),
            "queue_timeout": self.queue_timeout,
        }

    def usable(self, adapter_id: str) -> bool:
        """Loaded and not claimed by a waiter: a request for it runs at once."""
        return (
            adapter_id in self.loaded and adapter_id not in self.draining and adapter_id not in self.unloading
        )

    # -- acquiring -----------------------------------------------------------------------------------------

    def _touch(self, adapter_id: str) -> None:
        self.loaded.move_to_end(adapter_id)
        self.last_used[adapter_id] = time.time()

    def _take(self, adapter_id: str) -> AdapterRecord:
        self._touch(adapter_id)
        self.in_use[adapter_id] = self.in_use.get(adapter_id, 0) + 1
        return self.loaded[adapter_id]

    def _release(self, adapter_id: str) -> None:
        self.in_use[adapter_id] = max(0, self.in_use.get(adapter_id, 1) - 1)
        self.last_used[adapter_id] = time.time()
        if self.waiters:
            self._pump()

    async def _acquire(self, adapter_id: str) -> tuple[AdapterRecord, bool]:
        """Take a use of ``adapter_id`` (waiting for a slot if needed); returns its record and whether it was
        loaded (or claimed) while this request waited."""
        if self.usable(adapter_id):  # no await before the count is taken: eviction cannot interleave
            self.metrics.queue_wait.labels(adapter_id).observe(0.0)
            return self._take(adapter_id), False
        if adapter_id not in self.loaded and adapter_id not in self.loading:
            await asyncio.to_thread(self.lookup, adapter_id)  # 404 for an unknown id before it waits
            if self.usable(adapter_id):  # loaded by another request meanwhile
                self.metrics.queue_wait.labels(adapter_id).observe(0.0)
                return self._take(adapter_id), False
        loop = asyncio.get_running_loop()
        waiter = _Waiter(adapter_id, loop.create_future(), time.perf_counter())
        self.waiters.append(waiter)
        self._pump()
        try:
            async with asyncio.timeout(self.queue_timeout):
                record = await asyncio.shield(waiter.future)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception():
                self._drop(waiter)
                raise  # the load itself failed (with a TimeoutError): not a queue timeout
            waited = time.perf_counter() - waiter.since
            self._drop(waiter)
            self.metrics.queue_wait.labels(adapter_id).observe(waited)
            self.metrics.queue_timeouts.labels(adapter_id).inc()
            raise QueueTimeout(
                f"adapter '{adapter_id}' waited {waited:.1f} s for one of the {self.max_loaded} adapter slots "
                f"(--queue-timeout {self.queue_timeout:g}, --max-loaded {self.max_loaded}); retry later or "
                "start the server with a higher --max-loaded",
                retry_after=max(1, math.ceil(min(self.queue_timeout, 30.0) / 2)),
            ) from None
        except BaseException:
            self._drop(waiter)
            raise
        self.metrics.queue_wait.labels(adapter_id).observe(time.perf_counter() - waiter.since)
        return record, True

    def _drop(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue; a use it was granted meanwhile is given back."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(waiter.adapter_id)
        elif not future.done():
            future.cancel()
        self._pump()

    # -- the scheduler -------------------------------------------------------------------------------------

    def _grant(self, adapter_id: str) -> None:
        """Every waiter for ``adapter_id`` (now usable) proceeds with a use taken for it."""
        for waiter in [w for w in self.waiters if w.adapter_id == adapter_id]:
            self.waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_result(self._take(adapter_id))

    def _fail(self, adapter_id: str, error: BaseException) -> None:
        for waiter in [w for w in self.waiters if w.adapter_id == adapter_id]:
            self.waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _occupied(self) -> int:
        return len(self.loaded) + len(self.loading)

    def _pump(self) -> None:
        """Hand out slots in the order the waiting adapters' first requests came (synchronous: no await)."""
        order = list(dict.fromkeys(w.adapter_id for w in self.waiters))
        free = self.max_loaded - self._occupied()
        claimed: set[str] = set()  # victims taken (evicting or draining) by earlier adapters in the queue
        draining: dict[str, str] = {}
        served: set[str] = set()  # loaded adapters whose waiters came before the current one
        for position, adapter_id in enumerate(order):
            if adapter_id in self.loading or adapter_id in self.unloading or adapter_id in self.evicting:
                continue  # its waiters proceed when the load (or the unload, then a load) finishes
            if adapter_id in self.loaded:
                if adapter_id not in claimed:
                    self._grant(adapter_id)  # loaded and not claimed by anyone before it
                    served.add(adapter_id)
                continue  # otherwise it drains for an earlier waiter; its waiters wait behind that one
            if free > 0:
                free -= 1
                self._start_load(adapter_id, victim=None)
                continue
            later = set(order[position + 1 :])
            eligible = [
                v
                for v in self.loaded
                if v not in claimed
                and v not in served
                and v not in self.unloading
                and v not in order[:position]
            ]
            # idle victims first (evict now), those nobody waits for before those waited for; LRU within
            idle = [v for v in eligible if self.in_use.get(v, 0) == 0]
            if idle:
                victim = min(idle, key=lambda v: v in later)
                claimed.add(victim)
                self._start_load(adapter_id, victim=victim)
                continue
            previous = next((v for v, t in self.draining.items() if t == adapter_id), None)
            if previous in eligible:
                victim = previous  # keep draining the one already chosen: it is closest to free
            elif eligible:
                victim = min(eligible, key=lambda v: v in later)
            else:
                continue  # every slot is claimed by earlier waiters; this one waits its turn
            claimed.add(victim)
            draining[victim] = adapter_id
        self.draining = draining
        self.metrics.queue_waiting.set(len(self.waiters))
        if self.on_change is not None:
            self.on_change()

    def _start_load(self, adapter_id: str, *, victim: str | None) -> None:
        """Reserve a slot for ``adapter_id`` now (evicting idle ``victim`` from the books), load in a task."""
        if victim is not None:
            self.evicting[victim] = self.loaded.pop(victim)  # put back if the load fails before the unload
        self.loading[adapter_id] = victim
        task = asyncio.get_running_loop().create_task(self._load_task(adapter_id, victim))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_task(self, adapter_id: str, victim: str | None) -> None:
        try:
            record = await self._swap(adapter_id, victim)
        except BaseException as exc:
            del self.loading[adapter_id]
            error = exc if isinstance(exc, Exception) else RuntimeError("the load was cancelled")
            self._fail(adapter_id, error)
            self._pump()
            if not isinstance(exc, Exception):
                raise
            return
        del self.loading[adapter_id]
        self.loaded[adapter_id] = record
        self._touch(adapter_id)
        self.metrics.loaded.set(len(self.loaded))
        self._grant(adapter_id)
        self._pump()

    async def _swap(self, adapter_id: str, victim: str | None) -> AdapterRecord:
        """Check ``adapter_id``, unload ``victim`` (already off the books), load ``adapter_id``; on failure
        the victim is put back if it is still loaded in the engine."""
        started = time.perf_counter()
        try:
            record = await asyncio.to_thread(self.lookup, adapter_id)
            try:
                await asyncio.to_thread(check_adapter_for_base, record, self.base)
            except Conflict:
                self.metrics.refusals.labels(adapter_id).inc()
                raise
        except BaseException:
            self._restore(victim)
            raise
        if victim is not None:
            try:
                await self.engine.unload_adapter(victim)
            except BaseException:
                self._restore(victim)
                raise
            self.evicting.pop(victim, None)
            self.metrics.evictions.labels(victim).inc()
            self.metrics.loaded.set(len(self.loaded))
            if self.waiters:
                self._pump()  # a request for the victim may wait for its unload to end
        await self.engine.load_adapter(record)
        elapsed = time.perf_counter() - started
        self.load_seconds[adapter_id] = elapsed
        self.metrics.loads.labels(adapter_id).inc()
        self.metrics.load_seconds.observe(elapsed)
        return record

    def _restore(self, victim: str | None) -> None:
        if victim is not None and victim in self.evicting:
            self.loaded[victim] = self.evicting.pop(victim)
            self.loaded.move_to_end(victim, last=False)  # first in line for the next eviction

    # -- the API the server uses ---------------------------------------------------------------------------

    async def load(self, adapter_id: str) -> tuple[AdapterRecord, bool]:
        """Load ``adapter_id`` if it is not loaded (waiting for a slot like any request); returns its record
        and whether it was loaded now."""
        await self.current(adapter_id)
        if adapter_id in self.loaded:
            self._touch(adapter_id)
            return self.loaded[adapter_id], False
        record, loaded_now = await self._acquire(adapter_id)
        self._release(adapter_id)
        return record, loaded_now

    async def unload(self, adapter_id: str) -> None:
        if adapter_id not in self.loaded or adapter_id in self.unloading:
            await asyncio.to_thread(self.lookup, adapter_id)  # 404 for ids the registry does not know
            raise NotFound(f"adapter '{adapter_id}' is not loaded")
        busy = self.in_use.get(adapter_id, 0)
        if busy:
            raise AdapterInUse(
                f"adapter '{adapter_id}' is serving {busy} request(s); unload it when they are done"
            )
        self.unloading.add(adapter_id)  # still holds its slot, takes no requests, is no victim
        try:
            await self.engine.unload_adapter(adapter_id)
        except BaseException:
            self.unloading.discard(adapter_id)
            self._pump()
            raise
        self.unloading.discard(adapter_id)
        del self.loaded[adapter_id]
        self.metrics.unloads.labels(adapter_id).inc()
        self.metrics.loaded.set(len(self.loaded))
        self._pump()

    async def current(self, adapter_id: str) -> AdapterRecord:
        """The registry's record of ``adapter_id``, read off the event loop, checked against what is loaded.

        A loaded adapter whose row is gone (``clara adapters rm``) or now names other files (another checksum
        or base) is unloaded, so that the next use loads what the registry says; while requests still run on
        the old weights the new request gets 503 ``adapter_changed`` (retry shortly) instead of them.
        """
        try:
            record = await asyncio.to_thread(self.lookup, adapter_id)
        except NotFound:
            await self._retire(adapter_id, "was removed from the registry")
            raise
        loaded = self.loaded.get(adapter_id)
        if loaded is not None and _identity(loaded) != _identity(record):
            await self._retire(adapter_id, "changed in the registry (other files under this id)")
        return record

    async def _retire(self, adapter_id: str, why: str) -> None:
        if adapter_id not in self.loaded or adapter_id in self.unloading:
            return
        busy = self.in_use.get(adapter_id, 0)
        if busy:
            raise AdapterChanged(
                f"adapter '{adapter_id}' {why} while {busy} request(s) still run on its old weights; "
                "retry when they are done"
            )
        await self.unload(adapter_id)

    @asynccontextmanager
    async def use(self, adapter_id: str | None) -> AsyncIterator[AdapterRecord | None]:
        """Hold ``adapter_id`` loaded (waiting for a slot and hot-swapping it in if needed) for the duration
        of a request."""
        if adapter_id is None:
            yield None
            return
        record, _ = await self._acquire(adapter_id)
        try:
            yield record
        finally:
            self._release(adapter_id)


def _identity(record: AdapterRecord) -> tuple[str | None, str]:
    """What makes two records of one id the same adapter: the files (checksum) and the base they fit."""
    return record.adapter_checksum, record.base_model_hash
