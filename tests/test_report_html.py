"""clara report --html: one self-contained page whose plots really render, checked in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from clara_core.workspace import Workspace

from .test_report import OLD_RECORDS, RECORDS, STEUER_V2, write_log
from .test_report import ws as ws  # the fixture: a small registry with metrics

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")

BLUE = (0x2F, 0x6D, 0xB5)  # the first plot colour: bars of requests, p50, prompt tokens
ORANGE = (0xE0, 0x86, 0x2B)  # the second: p95, completion tokens


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def images(page: str) -> dict[str, str]:
    """data-plot name -> the SVG text of its inline image."""
    found = re.findall(
        r'<figure data-plot="([^"]+)"><img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"', page
    )
    return {name: base64.b64decode(data).decode("utf-8") for name, data in found}


def render(run_cli, ws: Workspace, target: Path) -> str:
    write_log(ws, OLD_RECORDS + RECORDS)
    result = run_cli("report", "--html", str(target), "--since", "2026-11-15")
    assert result.exit_code == 0, result.output
    return target.read_text(encoding="utf-8")


def test_html_is_self_contained_with_every_plot(ws: Workspace, run_cli, tmp_path: Path) -> None:
    page = render(run_cli, ws, tmp_path / "report.html")
    # nothing to fetch: no scripts, no external stylesheets or images, no URLs other than data: ones
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    plots = images(page)
    assert set(plots) == {
        "registry", "trend:ppl_dev", "trend:qa_f1", "timeline", "latency", "tokens", "errors", "routing", "routed",
    }  # fmt: skip
    for name, svg in plots.items():
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg, name
        assert svg.count("<path") > 5, name  # axes, ticks and the data drawn as paths
    assert STEUER_V2 in page and "engine_error" in page
    assert "2 request(s) before 2026-11-15T00:00:00Z not counted" in page
    default = run_cli("report", "--html")
    assert default.exit_code == 0, default.output
    assert len(list((ws.metadata_dir / "reports").glob("*-report.html"))) == 1


def _pixels(png: Path) -> Any:
    """The screenshot as an (height, width, 3) array of 0..255 integers."""
    from matplotlib import image

    return (image.imread(str(png))[:, :, :3] * 255).round().astype("int16")


def _near(pixels: Any, colour: tuple[int, int, int], tol: int = 6) -> int:
    """How many pixels are within ``tol`` of ``colour`` in every channel."""
    return int((abs(pixels - colour) <= tol).all(axis=2).sum())


def test_html_renders_with_its_plots_in_headless_chromium(ws: Workspace, run_cli, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    page = tmp_path / "report.html"
    render(run_cli, ws, page)
    shot = tmp_path / "shot.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,4000", f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={"HOME": str(tmp_path)})
    assert shot.is_file() and shot.stat().st_size > 0, done.stderr[-2000:]
    pixels = _pixels(shot)
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::7]}) > 50  # not blank, not one uniform colour
    # the plots' own colours are on screen: only the rendered SVG images draw them
    assert _near(pixels, BLUE) > 20000, "the blue bars and lines of the plots are not on the screenshot"
    assert _near(pixels, ORANGE) > 5000, "the orange bars of the plots are not on the screenshot"
    # and they come from the images: the same page with its images removed has none of them
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text(encoding="utf-8")), encoding="utf-8")
    shot_bare = tmp_path / "bare.png"
    command[-2:] = [f"--screenshot={shot_bare}", bare.as_uri()]
    subprocess.run(command, capture_output=True, text=True, timeout=120, env={"HOME": str(tmp_path)})
    assert _near(_pixels(shot_bare), BLUE) < 50
