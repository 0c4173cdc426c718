"""Monitoring reports: what the registry holds, how its adapters measure over versions, and how the server was
used (from the per-request JSON lines in ``metadata/logs/``).

:mod:`.collect` gathers everything into one JSON-ready dict (no heavy imports), :mod:`.text` prints it for a
terminal and :mod:`.html` renders it as one self-contained HTML page with plots (matplotlib, imported only
there). ``clara report`` (:mod:`clara_core.commands.report`) ties them together.
"""

from __future__ import annotations

from .collect import REPORT_FORMAT, collect_report, parse_since, percentile

__all__ = ["REPORT_FORMAT", "collect_report", "parse_since", "percentile"]
