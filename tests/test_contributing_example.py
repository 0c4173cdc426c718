"""The plugin example in CONTRIBUTING.md is complete and works: its files are extracted, installed on sys.path
with an entry point, and its own test is run."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from clara_core.plugins import PluginManager

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def example_files() -> dict[str, str]:
    text = CONTRIBUTING.read_text(encoding="utf-8")
    pattern = re.compile(
        r"`(plugins/clara-plugin-pissa/[^`]+)`[^\n]*\n(?:[^\n]*\n)*?\n?```(?:toml|python)\n(.*?)```", re.S
    )
    return {name: body for name, body in pattern.findall(text)}


def test_contributing_plugin_example_runs(tmp_path, monkeypatch):
    files = example_files()
    assert set(files) == {
        "plugins/clara-plugin-pissa/pyproject.toml",
        "plugins/clara-plugin-pissa/clara_plugin_pissa.py",
        "plugins/clara-plugin-pissa/tests/test_pissa.py",
    }
    assert (
        '[project.entry-points.clara]\npissa = "clara_plugin_pissa"'
        in files["plugins/clara-plugin-pissa/pyproject.toml"]
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "clara_plugin_pissa.py").write_text(files["plugins/clara-plugin-pissa/clara_plugin_pissa.py"])
    info = site / "clara_plugin_pissa-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clara-plugin-pissa\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[clara]\npissa = clara_plugin_pissa\n")
    monkeypatch.syspath_prepend(str(site))

    # Installed, it loads through its entry point like any plugin.
    monkeypatch.setenv("CLARA_LOAD_PLUGINS", "pissa")
    manager = PluginManager.from_environment()
    assert list(manager.trainer_methods()) == ["pissa"]
    assert manager.plugins()[0].distribution == "clara-plugin-pissa"

    # Its own test passes.
    namespace: dict = {}
    exec(
        compile(
            textwrap.dedent(files["plugins/clara-plugin-pissa/tests/test_pissa.py"]), "test_pissa.py", "exec"
        ),
        namespace,
    )
    namespace["test_pissa_registers_and_builds_its_config"](tmp_path / "run")
