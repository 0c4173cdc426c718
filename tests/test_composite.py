"""clara composite build/list/show on a tiny Llama with PEFT-made adapters: exact where the math allows (the
dense sum of the components' deltas, as PEFT itself computes them), within the recorded error elsewhere
(DoRA, --rank), the same inputs giving the same checksum, and every refusal leaving nothing behind."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_core.cli import ClaraContext, cli
from clara_core.plugins import PluginManager
from clara_core.workspace import Workspace

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"


def plugin_module(distribution: str, module: str):
    """The plugin's module: installed, or (in a venv made before it existed) loaded from its source file."""
    import importlib
    import importlib.util
    import sys

    try:
        return importlib.import_module(module)
    except ImportError:
        spec = importlib.util.spec_from_file_location(module, PLUGINS_DIR / distribution / f"{module}.py")
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded
        spec.loader.exec_module(loaded)
        return loaded


def make_adapter(
    base_dir: Path, out_dir: Path, *, seed: int, rank: int = 4, scale: float = 0.3, **lora
) -> Path:
    """A PEFT adapter with random non-zero factors (and, for DoRA, a perturbed magnitude)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora.setdefault("target_modules", ATTN)
    config = LoraConfig(r=rank, lora_alpha=lora.pop("lora_alpha", 2 * rank), task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def made(
    tiny_base_dir: Path, other_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Adapter folders: mixed ranks, rsLoRA with an alpha pattern, rank pattern, DoRA, and another base's."""
    root = tmp_path_factory.mktemp("made")
    return {
        "steuer": make_adapter(tiny_base_dir, root / "steuer", seed=1, rank=4),
        "verfahren": make_adapter(
            tiny_base_dir,
            root / "verfahren",
            seed=2,
            rank=8,
            use_rslora=True,
            alpha_pattern={"v_proj": 3.0},
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),
        "umwelt": make_adapter(tiny_base_dir, root / "umwelt", seed=3, rank=2, rank_pattern={"o_proj": 6}),
        "dora": make_adapter(tiny_base_dir, root / "dora", seed=4, rank=4, use_dora=True),
        "fremd": make_adapter(other_base_dir, root / "fremd", seed=5, rank=4),
    }


def manager() -> PluginManager:
    plugins = PluginManager(load_entry_points=False)
    plugins.register(
        plugin_module("clara-plugin-merge", "clara_plugin_merge"),
        name="merge",
        distribution="clara-plugin-merge",
    )
    return plugins


def run(ws: Workspace, *args: str, plugins: PluginManager | None = None) -> Result:
    obj = ClaraContext(workspace=ws.root, plugins=plugins or manager())
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=True)


@pytest.fixture(scope="session")
def registered(tmp_path_factory, tiny_base_dir, other_base_dir, made) -> Workspace:
    """A workspace with both bases and the adapters registered (ids in ``IDS``); tests copy it."""
    ws, _ = Workspace.init(tmp_path_factory.mktemp("ws-template") / "ws")
    assert run(ws, "base", "add", str(tiny_base_dir), "--name", "tiny").exit_code == 0
    assert run(ws, "base", "add", str(other_base_dir), "--name", "other").exit_code == 0
    for domain, folder in made.items():
        base = "other" if domain == "fremd" else "tiny"
        result = run(ws, "adapters", "register", str(folder), "--domain", domain, "--base", base)
        assert result.exit_code == 0, result.output
    return ws


IDS = {
    "steuer": "steuer-lora-r4-v1",
    "verfahren": "verfahren-lora-r8-v1",
    "umwelt": "umwelt-lora-r2-v1",
    "dora": "dora-dora-r4-v1",
    "fremd": "fremd-lora-r4-v1",
}


@pytest.fixture
def ws(registered: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(registered.root, tmp_path / "ws")
    return Workspace.find(tmp_path / "ws")


def component_deltas(base_dir: Path, folder: Path) -> dict[str, object]:
    """The dense weight delta of every module, as PEFT itself merges the adapter (DoRA, rsLoRA, patterns)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    out = {}
    for key, value in merged.state_dict().items():
        if key in before and not torch.equal(value, before[key]):
            out[key[: -len(".weight")]] = (value - before[key]).double()
    return out


def snapshot(ws: Workspace) -> dict:
    conn = sqlite3.connect(ws.registry_path)
    try:
        state = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("adapters", "lineage")}
    finally:
        conn.close()
    state["folders"] = sorted(str(p.relative_to(ws.root)) for p in (ws.root / "models").rglob("*"))
    return state


def build(ws: Workspace, *args: str, plugins: PluginManager | None = None) -> dict:
    result = run(ws, "composite", "build", *args, "--json", plugins=plugins)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def exact_sum(base_dir: Path, made: dict[str, Path], weighted: dict[str, float]) -> dict[str, object]:
    total: dict[str, object] = {}
    for name, weight in weighted.items():
        for module, delta in component_deltas(base_dir, made[name]).items():
            total[module] = total[module] + weight * delta if module in total else weight * delta
    return total


def test_weighted_composite_is_the_exact_dense_sum_and_gives_the_same_logits(ws, made, tiny_base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = build(
        ws, "--adapters", IDS["steuer"], IDS["verfahren"], IDS["umwelt"], "--strategy", "weighted",
        "--weights", "0.7", "-0.4", "1.5",
    )  # fmt: skip
    assert entry["kind"] == "composite"
    assert entry["max_relative_error"] == 0.0
    folder = ws.root / entry["path"]
    assert folder.parent == ws.composites_dir and folder.name.endswith("_steuer+verfahren+umwelt")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["use_dora"] is False
    # rank = sum of the ranks touching a module: q_proj 4+8+2, k_proj 4+2, o_proj 4+6 (umwelt's rank pattern)
    assert entry["rank"] == 14

    expected = exact_sum(tiny_base_dir, made, {"steuer": 0.7, "verfahren": -0.4, "umwelt": 1.5})
    got = component_deltas(tiny_base_dir, folder)
    assert set(got) == set(expected)  # the union: up_proj only from verfahren
    for module, delta in expected.items():
        assert (got[module] - delta).abs().max() < 1e-5 * max(1.0, float(delta.abs().max())), module

    # logits: the composite in plain PEFT == the base with the components' deltas added by hand
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    by_hand = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    with torch.no_grad():
        for module, delta in expected.items():
            by_hand.get_submodule(module).weight.add_(delta.float())
        want = by_hand(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(base, str(folder))(ids).logits
    assert torch.allclose(peft_logits, want, atol=1e-4)


def test_additive_is_the_plain_sum(ws, made, tiny_base_dir):
    entry = build(ws, "--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "additive")
    expected = exact_sum(tiny_base_dir, made, {"steuer": 1.0, "umwelt": 1.0})
    got = component_deltas(tiny_base_dir, ws.root / entry["path"])
    for module, delta in expected.items():
        assert (got[module] - delta).abs().max() < 1e-5, module


def relative_errors(got: dict, expected: dict) -> dict[str, float]:
    return {m: float((got[m] - d).norm() / d.norm()) for m, d in expected.items()}


def test_dora_composite_is_within_the_recorded_error_and_printed(ws, made, tiny_base_dir):
    result = run(
        ws, "composite", "build", "--adapters", IDS["dora"], IDS["verfahren"], "--weights", "0.5", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "relative error    max" in result.stdout
    shown = json.loads(run(ws, "composite", "show", "dora_verfahren-weighted-r12-v1", "--json").stdout)
    recorded = shown["composite"]["relative_errors"]
    expected = exact_sum(tiny_base_dir, made, {"dora": 0.5, "verfahren": 0.5})
    got = component_deltas(tiny_base_dir, ws.root / shown["path"])
    measured = relative_errors(got, expected)
    assert set(recorded) == set(expected)
    for module in expected:
        # the recorded error is the stored factors' error against the exact merged delta (float32 storage)
        assert measured[module] == pytest.approx(recorded[module], abs=1e-5), module
    assert max(recorded.values()) > 0  # DoRA: no exact low-rank form at this rank
    assert not shown["composite"]["exact"]


def test_rank_compression_records_the_error_a_recomputation_finds(ws, made, tiny_base_dir):
    entry = build(ws, "--adapters", IDS["steuer"], IDS["verfahren"], "--weights", "1", "1", "--rank", "5")
    assert entry["rank"] == 5
    shown = json.loads(run(ws, "composite", "show", entry["id"], "--json").stdout)
    recorded = shown["composite"]["relative_errors"]
    expected = exact_sum(tiny_base_dir, made, {"steuer": 1.0, "verfahren": 1.0})
    measured = relative_errors(component_deltas(tiny_base_dir, ws.root / entry["path"]), expected)
    for module in expected:
        assert measured[module] == pytest.approx(recorded[module], abs=1e-5), module
    # k_proj and o_proj (rank 4 from steuer only) stay exact; q_proj (4 + 8) is truncated
    assert recorded["model.layers.0.self_attn.k_proj"] == 0.0
    assert recorded["model.layers.0.self_attn.q_proj"] > 0.01


def test_same_inputs_same_folder_and_checksum_and_a_second_build_says_where(ws):
    args = ("--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "0.5", "0.5")
    first = build(ws, *args)
    again = run(ws, "composite", "build", *args)
    assert again.exit_code == 0
    assert f"exists already at {first['path']}" in again.stdout
    # built afresh in another workspace copy: same folder name, same checksum
    other = Workspace.find(shutil.copytree(ws.root, ws.root.parent / "ws2"))
    shutil.rmtree(other.root / first["path"])
    sqlite3.connect(other.registry_path).execute("DELETE FROM lineage").connection.commit()
    conn = sqlite3.connect(other.registry_path)
    conn.execute("DELETE FROM adapters WHERE kind = 'composite'")
    conn.commit()
    conn.close()
    second = build(other, *args)
    assert second["adapter_checksum"] == first["adapter_checksum"]
    assert second["path"] == first["path"]


def test_sequential_equals_weighted_for_lora_and_depends_on_order_with_dora(ws, made, tiny_base_dir):
    seq = build(ws, "--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "sequential")
    add = component_deltas(tiny_base_dir, ws.root / seq["path"])
    expected = exact_sum(tiny_base_dir, made, {"steuer": 1.0, "umwelt": 1.0})
    assert all((add[m] - expected[m]).abs().max() < 1e-5 for m in expected)
    one = build(ws, "--adapters", IDS["dora"], IDS["steuer"], "--strategy", "sequential")
    two = build(ws, "--adapters", IDS["steuer"], IDS["dora"], "--strategy", "sequential")
    assert one["adapter_checksum"] != two["adapter_checksum"]


def test_list_and_show(ws):
    entry = build(ws, "--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "0.25", "0.75")
    listed = run(ws, "composite", "list")
    assert entry["id"] in listed.stdout and "steuer-lora-r4-v1×0.25" in listed.stdout
    as_json = json.loads(run(ws, "composite", "list", "--json").stdout)
    assert [c["id"] for c in as_json] == [entry["id"]]
    lineage = as_json[0]["lineage"]
    assert [(i["component_id"], i["weight"], i["strategy"]) for i in lineage] == [
        (IDS["steuer"], 0.25, "weighted"),
        (IDS["umwelt"], 0.75, "weighted"),
    ]
    assert all(i["component_checksum"] for i in lineage)
    shown = run(ws, "composite", "show", entry["id"])
    assert "component 1" in shown.stdout and "exact             yes" in shown.stdout
    info = json.loads(run(ws, "composite", "show", entry["id"], "--json").stdout)["composite"]
    assert info["clara_version"] and info["strategy"] == "weighted"
    # a composite is an adapter for every other command
    assert run(ws, "adapters", "show", entry["id"]).exit_code == 0
    assert run(ws, "adapters", "verify", entry["id"]).exit_code == 0
    not_composite = run(ws, "composite", "show", IDS["steuer"])
    assert not_composite.exit_code != 0 and "not a composite" in not_composite.output


def test_layer_conflicts_are_warned_with_each_components_share(ws):
    result = run(
        ws, "composite", "build", "--adapters", IDS["steuer"], IDS["verfahren"], "--weights", "1", "1"
    )
    assert result.exit_code == 0
    # the next command is spelt as it can be typed here (no bare 'clara' that is not on PATH)
    next_line = next(x for x in result.stdout.splitlines() if x.startswith("Next: "))
    assert next_line.endswith("-m clara_core.cli composite show " + result.stdout.split()[2]), next_line
    assert "layer conflict: 4 module(s)" in result.stderr  # q_proj and v_proj of 2 layers
    line = next(x for x in result.stderr.splitlines() if "layers.0.self_attn.q_proj" in x)
    shares = [
        float(part.split()[-1].rstrip("%")) for part in line.split(":", 1)[1].split(" of ")[0].split(",")
    ]
    assert math.isclose(sum(shares), 100, abs_tol=1.5)


# -- refusals: one line, non-zero exit, nothing written ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapters", IDS["steuer"], IDS["fremd"], "--weights", "1", "1"], "different bases"),
        (["--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1"], "1 value(s) for 2 adapters"),
        (["--adapters", IDS["steuer"], "steuer-lora-r4-v9", "--weights", "1", "1"], "steuer-lora-r4-v9"),
        (["--adapters", IDS["steuer"], "--weights", "1"], "at least two adapters"),
        (["--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "nan", "1"], "finite"),
        (
            ["--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1", "--rank", "11"],
            "above the exact rank 10",
        ),
        (["--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1", "--rank", "0"], "at least 1"),
        (["--adapters", IDS["steuer"], IDS["umwelt"]], "needs --weights"),
        (
            ["--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "additive", "--weights", "1", "2"],
            "no --weights",
        ),
        (
            ["--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "nosuch"],
            "unknown merge strategy 'nosuch'",
        ),
        (["--adapters", IDS["steuer"], IDS["steuer"], "--weights", "1", "1"], "more than once"),
    ],
)
def test_refusals_leave_nothing(ws, args, message):
    before = snapshot(ws)
    result = run(ws, "composite", "build", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert snapshot(ws) == before


def test_changed_component_files_are_refused(ws):
    folder = ws.root / json.loads(run(ws, "adapters", "show", IDS["umwelt"], "--json").stdout)["path"]
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 99
    (folder / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(ws)
    result = run(ws, "composite", "build", "--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1")
    assert result.exit_code != 0 and "files changed since registration" in result.output
    assert snapshot(ws) == before


def test_an_existing_out_folder_is_refused(ws, tmp_path):
    args = ["--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1", "--out", str(tmp_path / "out")]
    entry = build(ws, *args)
    folder = Path(entry["path"]) if Path(entry["path"]).is_absolute() else ws.root / entry["path"]
    # unregister it, keep the folder: the next build must not overwrite it
    conn = sqlite3.connect(ws.registry_path)
    conn.execute("DELETE FROM lineage")
    conn.execute("DELETE FROM adapters WHERE kind = 'composite'")
    conn.commit()
    conn.close()
    before = snapshot(ws)
    result = run(ws, "composite", "build", *args)
    assert result.exit_code != 0 and "already exists" in result.output and str(folder) in result.output
    assert snapshot(ws) == before


@pytest.mark.parametrize("error", [RuntimeError("disk gone"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("where", ["merge_module", "add_lineage"])
def test_a_failure_or_ctrl_c_midway_leaves_no_folder_and_no_row(ws, monkeypatch, error, where):
    from clara_core.registry import Registry

    def broken(*args, **kwargs):
        raise error

    if where == "add_lineage":  # after the folder was renamed into place and its row inserted
        monkeypatch.setattr(Registry, "add_lineage", broken)
    else:  # halfway through the modules
        strategy = plugin_module("clara-plugin-merge", "clara_plugin_merge").Weighted
        calls = {"n": 0}
        original = strategy.merge_module

        def halfway(self, request):
            calls["n"] += 1
            if calls["n"] > 3:
                raise error
            return original(self, request)

        monkeypatch.setattr(strategy, "merge_module", halfway)
    before = snapshot(ws)
    result = run(ws, "composite", "build", "--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1")
    assert result.exit_code != 0
    assert snapshot(ws) == before
    assert not ws.tmp_dir.exists() or not [p for p in ws.tmp_dir.iterdir() if p.name.startswith("composite")]


def test_name_sets_the_domain_of_the_id_and_the_folder(ws):
    entry = build(
        ws, "--adapters", IDS["steuer"], IDS["umwelt"], "--weights", "1", "1", "--name", "Steuer-Umwelt"
    )
    assert entry["id"] == "steuer_umwelt-weighted-r10-v1"
    assert entry["path"].endswith("_steuer_umwelt")
    bad = run(
        ws,
        "composite",
        "build",
        "--adapters",
        IDS["steuer"],
        IDS["umwelt"],
        "--weights",
        "1",
        "1",
        "--name",
        "a/b",
    )
    assert bad.exit_code != 0 and "invalid domain" in bad.output


def test_merge_into_base_writes_the_exact_merged_model_marked_merged(ws, made, tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    args = ["--adapters", IDS["dora"], IDS["verfahren"], "--weights", "0.5", "0.5"]
    entry = build(ws, *args, "--merge-into-base")
    assert entry["kind"] == "merged" and entry["max_relative_error"] == 0.0
    folder = ws.root / entry["path"]
    assert not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).state_dict()
    expected = exact_sum(tiny_base_dir, made, {"dora": 0.5, "verfahren": 0.5})
    for key, value in base.items():
        module = key[: -len(".weight")]
        want = value.double() + expected[module] if module in expected else value.double()
        assert (merged[key].double() - want).abs().max() < 1e-5, key  # exact, DoRA included
    assert run(ws, "adapters", "verify", entry["id"]).exit_code == 0
    shown = run(ws, "composite", "show", entry["id"])
    assert "(merged, strategy weighted" in shown.stdout
    # the adapter composite of the same inputs is another folder and row
    adapter = build(ws, *args)
    assert adapter["kind"] == "composite" and adapter["path"] != entry["path"]
    refused = run(ws, "composite", "build", *args, "--merge-into-base", "--rank", "4")
    assert refused.exit_code != 0 and "--rank has no use with --merge-into-base" in refused.output


# -- serving: the transformers engine serves a composite mixed into a batch with its components -----------------


def test_the_serving_engine_serves_a_composite_in_a_batch_with_its_components(ws):
    import concurrent.futures

    import httpx

    from clara_core.serving.runner import BackgroundServer, prepare
    from clara_core.serving.state import ServeSettings

    composite = build(ws, "--adapters", IDS["steuer"], IDS["dora"], "--weights", "0.6", "0.6")["id"]
    adapters = [composite, IDS["steuer"], IDS["dora"]]
    settings = ServeSettings(max_loaded=4, max_queue=64)
    state = prepare(ws, PluginManager(), engine_name="transformers", base_name="tiny", settings=settings)

    def generate(client: httpx.Client, adapter: str) -> str:
        body = {"prompt": "Das Finanzamt setzt", "max_tokens": 8, "adapter_id": adapter, "temperature": 0}
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()["text"]

    with BackgroundServer(state) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        alone = {a: generate(client, a) for a in adapters}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            mixed = list(pool.map(lambda a: (a, generate(client, a)), adapters * 2))
    assert all(text == alone[a] for a, text in mixed)
    assert alone[composite] not in (alone[IDS["steuer"]], alone[IDS["dora"]])


# -- a third-party strategy plugin: clara-plugin-merge-ties ----------------------------------------------------


def with_ties() -> PluginManager:
    plugins = manager()
    plugins.register(
        plugin_module("clara-plugin-merge-ties", "clara_plugin_merge_ties"),
        name="merge_ties",
        distribution="clara-plugin-merge-ties",
    )
    return plugins


def test_strategy_flags_appear_only_with_the_plugin_and_reach_the_strategy(ws, made, tiny_base_dir):
    assert "--density" not in run(ws, "composite", "build", "--help").stdout
    helped = run(ws, "composite", "build", "--help", plugins=with_ties()).stdout
    assert (
        "--density" in helped and "--majority-sign" in helped and "[dare_linear, dare_ties, ties]" in helped
    )

    args = ["--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "ties", "--weights", "1", "0.5"]
    entry = build(ws, *args, "--density", "0.3", "--majority-sign", "frequency", plugins=with_ties())
    shown = json.loads(run(ws, "composite", "show", entry["id"], "--json").stdout)
    assert shown["composite"]["options"] == {"density": 0.3, "majority_sign": "frequency"}
    assert shown["lineage"][0]["options"] == {"density": 0.3, "majority_sign": "frequency"}
    # the stored composite is the TIES of the components' deltas within the recorded error
    ties = plugin_module("clara-plugin-merge-ties", "clara_plugin_merge_ties").ties
    steuer = component_deltas(tiny_base_dir, made["steuer"])
    umwelt = component_deltas(tiny_base_dir, made["umwelt"])
    got = component_deltas(tiny_base_dir, ws.root / entry["path"])
    recorded = shown["composite"]["relative_errors"]
    for module in steuer:
        parts = [(steuer[module], 1.0)] + ([(umwelt[module], 0.5)] if module in umwelt else [])
        want = ties([p for p, _ in parts], [w for _, w in parts], 0.3, "frequency")
        error = float((got[module] - want).norm() / want.norm())
        assert error == pytest.approx(recorded[module], abs=1e-5), module

    weighted = [*args[:3], "--weights", "1", "1", "--density", "0.3"]
    refused = run(ws, "composite", "build", *weighted, plugins=with_ties())
    assert refused.exit_code != 0 and "--density is not an option of strategy 'weighted'" in refused.output
    bad = run(ws, "composite", "build", *args, "--density", "1.5", plugins=with_ties())
    assert bad.exit_code != 0 and "--density must be above 0 and at most 1" in bad.output
    sign = run(ws, "composite", "build", *args, "--majority-sign", "most", plugins=with_ties())
    assert sign.exit_code != 0 and "total or frequency" in sign.output


def test_dare_seed_makes_the_drop_reproducible(ws):
    args = ["--adapters", IDS["steuer"], IDS["umwelt"], "--strategy", "dare_linear", "--density", "0.5"]
    one = build(ws, *args, "--seed", "1", plugins=with_ties())
    again = run(ws, "composite", "build", *args, "--seed", "1", plugins=with_ties())
    assert "exists already" in again.stdout
    two = build(ws, *args, "--seed", "2", plugins=with_ties())
    assert one["adapter_checksum"] != two["adapter_checksum"]


def test_module_scaling_follows_peft_for_patterns_rslora_and_an_explicit_zero_alpha() -> None:
    from clara_core.composites.tensors import module_scaling

    assert module_scaling({"lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert module_scaling({}, "model.layers.0.self_attn.q_proj", 8) == 1.0  # PEFT's default alpha is 8
    assert module_scaling({"lora_alpha": 0}, "model.layers.0.self_attn.q_proj", 8) == 0.0
    assert module_scaling({"lora_alpha": 8, "use_rslora": True}, "x.v_proj", 16) == 2.0
    config = {"lora_alpha": 8, "alpha_pattern": {"v_proj": 32}}
    assert module_scaling(config, "model.layers.3.self_attn.v_proj", 8) == 4.0
    assert module_scaling(config, "model.layers.3.self_attn.q_proj", 8) == 1.0


def test_the_randomized_svd_is_as_good_as_the_full_one_and_does_not_depend_on_the_random_state() -> None:
    import torch

    from clara_core.composites.tensors import _relative_error, _svd_factors

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(160, 96, generator=generator, dtype=torch.float64)
    low = torch.randn(160, 12, generator=generator, dtype=torch.float64) @ torch.randn(
        12, 96, generator=generator, dtype=torch.float64
    )
    rows = 1 + 0.1 * torch.rand(160, 1, generator=generator, dtype=torch.float64)
    delta = rows * (weight + low) - weight  # a DoRA-like delta: low rank plus a full-rank row rescaling
    s = torch.linalg.svdvals(delta)
    optimal = float(s[12:].norm() / s.norm())
    torch.manual_seed(1)
    a1, b1 = _svd_factors(delta, 12)
    torch.manual_seed(2)
    a2, b2 = _svd_factors(delta, 12)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert _relative_error(delta, a1, b1) == pytest.approx(optimal, rel=1e-4)
