"""Run a module (``-m name``) or a script and report its peak memory on stderr when it exits.

Peak resident memory (ru_maxrss) of the process, and on a GPU the peak memory torch allocated, so that every
variant of the benchmark is measured the same way, each in a fresh process.
"""

from __future__ import annotations

import atexit
import resource
import runpy
import sys


def _report() -> None:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = -1
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.max_memory_allocated()
    print(f"BENCH_PEAK rss_kb={rss_kb} gpu_bytes={gpu}", file=sys.stderr, flush=True)


atexit.register(_report)
if sys.argv[1] == "-m":
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
