"""GGUF LoRA adapters written by clara-plugin-gguf, read back with gguf's own reader: llama.cpp's layout and keys,
and llama.cpp's scale (alpha / rank per tensor) times the stored factors giving exactly the delta PEFT itself
merges (plain LoRA, rsLoRA with alpha and rank patterns, composites), DoRA as an SVD within its recorded error,
and what a GGUF adapter cannot carry refused with the way out (--merged)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip(
    "gguf", reason="the GGUF export needs the gguf package (pip install -e plugins/clara-plugin-gguf)"
)
pytest.importorskip("peft", reason="the reference deltas come from PEFT")

from clara_core.cli import ClaraContext, cli
from clara_core.plugin_api import Conflict, InvalidInput
from clara_core.plugins import PluginManager
from clara_core.registry import Registry
from clara_core.workspace import Workspace


def cli_run(ws: Workspace, *args: str):
    import importlib

    plugins = PluginManager(load_entry_points=False)
    plugins.register(
        importlib.import_module("clara_plugin_merge"), name="merge", distribution="clara-plugin-merge"
    )
    return CliRunner().invoke(cli, list(args), obj=ClaraContext(workspace=ws.root, plugins=plugins))


ADAPTERS = {
    "plain": {"seed": 1, "rank": 4},
    "rs": {
        "seed": 2,
        "rank": 8,
        "use_rslora": True,
        "alpha_pattern": {"v_proj": 3.0},
        "rank_pattern": {"o_proj": 2},
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
    },
    "dora": {"seed": 3, "rank": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "head": {"seed": 4, "rank": 4, "target_modules": ["q_proj", "lm_head"]},
    "saved": {"seed": 5, "rank": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "embed": {"seed": 6, "rank": 4, "target_modules": ["q_proj", "embed_tokens"]},
}


@pytest.fixture(scope="module")
def base_dir(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def registered(
    base_dir: Path, tmp_path_factory: pytest.TempPathFactory, make_adapter: Callable[..., Path]
) -> tuple[Workspace, dict[str, Path]]:
    """A workspace with the tiny base and one adapter of each kind in :data:`ADAPTERS` (domain = the key)."""
    root = tmp_path_factory.mktemp("gguf-adapter-ws")
    ws, _ = Workspace.init(root / "ws")
    assert cli_run(ws, "base", "add", str(base_dir), "--name", "tiny").exit_code == 0
    made = {}
    for domain, kwargs in ADAPTERS.items():
        made[domain] = make_adapter(base_dir, root / "made" / domain, **kwargs)
        result = cli_run(ws, "adapters", "register", str(made[domain]), "--domain", domain, "--base", "tiny")
        assert result.exit_code == 0, result.output
    return ws, made


def records(ws: Workspace, domain: str):
    with Registry.open(ws.registry_path) as registry:
        adapter = next(a for a in registry.list_adapters() if a.domain == [domain])
        return adapter, registry.get_base("tiny")


def peft_deltas(base_dir: Path, folder: Path) -> dict[str, object]:
    """Every weight's delta as PEFT itself merges the adapter (float64 reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return {
        key[: -len(".weight")]: (value - before[key])
        for key, value in merged.state_dict().items()
        if key in before and not torch.equal(value, before[key])
    }


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    return fields, tensors


def llama_cpp_deltas(path: Path, config: dict) -> dict[str, object]:
    """What llama.cpp adds per base tensor: ``alpha / rank * B @ A`` (``rank`` from lora_b's shape), in the GGUF
    row order."""
    fields, tensors = read_gguf(path)
    alpha = float(fields["adapter.lora.alpha"])
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name[: -len("a")] + "b"]
            rank = b.shape[1]
            out[name[: -len(".lora_a")]] = (alpha / rank if alpha else 1.0) * (b @ a)
    return out


def in_gguf_order(config: dict, deltas: dict[str, object]) -> dict[str, object]:
    from clara_plugin_gguf import base as gguf_base

    out = {}
    for module, delta in deltas.items():
        transform = gguf_base.row_transform(config, module)
        array = delta.numpy()
        out[f"{gguf_base.tensor_name(config, module)}.weight"] = transform(array) if transform else array
    return out


def assert_same_deltas(got: dict, want: dict, tol: float = 1e-6) -> None:
    import numpy as np

    assert sorted(got) == sorted(want)
    for name, delta in want.items():
        scale = max(1e-12, float(np.abs(delta).max()))
        assert float(np.abs(got[name] - delta).max()) / scale < tol, name


def test_plain_lora_has_llama_cpp_layout_and_exactly_peft_delta(registered, base_dir, tmp_path):
    from clara_plugin_gguf.adapter import convert_adapter

    ws, made = registered
    adapter, base = records(ws, "plain")
    conversion = convert_adapter(adapter, base, tmp_path / "plain.gguf")
    assert conversion.method == "exact" and conversion.errors == {} and conversion.alpha == 8.0
    fields, tensors = read_gguf(conversion.path)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert fields["general.architecture"] == "llama"
    assert fields["clara.adapter_checksum"] == adapter.adapter_checksum
    hidden, kv = 64, 2 * 16
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, hidden)  # [r, in], PEFT's lora_A
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (kv, 4)  # [out, r], PEFT's lora_B
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == (4, 128)
    assert len(tensors) == 2 * 7 * 2  # two layers, seven modules, A and B
    expected = in_gguf_order(base.config, peft_deltas(base_dir, made["plain"]))
    assert_same_deltas(llama_cpp_deltas(conversion.path, base.config), expected)
    assert oct(conversion.path.stat().st_mode & 0o777) == oct(0o644)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_rslora_alpha_and_rank_patterns_are_folded_in_exactly(registered, base_dir, tmp_path):
    from clara_plugin_gguf.adapter import convert_adapter

    ws, made = registered
    adapter, base = records(ws, "rs")
    conversion = convert_adapter(adapter, base, tmp_path / "rs.gguf")
    _fields, tensors = read_gguf(conversion.path)
    assert tensors["blk.0.attn_output.weight.lora_a"].shape[0] == 2  # the rank pattern
    assert tensors["blk.0.attn_q.weight.lora_a"].shape[0] == 8
    # one file-wide alpha, three different PEFT scalings (16/sqrt(8), 3/sqrt(8), 16/sqrt(2)): all exact
    expected = in_gguf_order(base.config, peft_deltas(base_dir, made["rs"]))
    assert_same_deltas(llama_cpp_deltas(conversion.path, base.config), expected)


def test_a_composite_converts_like_any_lora(registered, base_dir, tmp_path):
    from clara_plugin_gguf.adapter import convert_adapter

    ws, made = registered
    copy = Workspace.find(Path(shutil.copytree(ws.root, tmp_path / "ws")))
    plain, _ = records(copy, "plain")
    rs, _ = records(copy, "rs")
    result = cli_run(
        copy, "composite", "build", "--adapters", plain.id, rs.id, "--strategy", "weighted",
        "--weights", "0.5", "1.5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    with Registry.open(copy.registry_path) as registry:
        composite = registry.get_adapter(entry["id"])
        base = registry.get_base("tiny")
    assert composite.kind == "composite"
    conversion = convert_adapter(composite, base, tmp_path / "composite.gguf")
    assert conversion.method == "exact"
    a, b = peft_deltas(base_dir, made["plain"]), peft_deltas(base_dir, made["rs"])
    summed = {m: 0.5 * a.get(m, 0) + 1.5 * b.get(m, 0) for m in set(a) | set(b)}
    assert_same_deltas(
        llama_cpp_deltas(conversion.path, base.config), in_gguf_order(base.config, summed), 1e-5
    )


def test_dora_is_an_svd_within_its_recorded_error(registered, base_dir, tmp_path):
    import numpy as np
    from clara_plugin_gguf.adapter import convert_adapter

    ws, made = registered
    adapter, base = records(ws, "dora")
    lines: list[str] = []
    conversion = convert_adapter(adapter, base, tmp_path / "dora.gguf", echo=lines.append)
    assert conversion.method == "svd"
    assert len(conversion.errors) == 2 * 3  # every DoRA module, each with its error
    assert any(line.startswith("DoRA: 6 module(s) exported as the truncated SVD") for line in lines)
    want = in_gguf_order(base.config, peft_deltas(base_dir, made["dora"]))
    got = llama_cpp_deltas(conversion.path, base.config)
    assert sorted(got) == sorted(want)
    from clara_plugin_gguf import base as gguf_base

    for module, error in conversion.errors.items():
        name = f"{gguf_base.tensor_name(base.config, module)}.weight"
        measured = float(np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name]))
        assert measured == pytest.approx(error, rel=1e-3, abs=1e-6), module
        assert np.linalg.matrix_rank(got[name]) <= 4  # the adapter's rank

    # --svd-rank: a higher rank keeps more of every delta; at the module's full rank the SVD is the delta
    lines.clear()
    higher = convert_adapter(adapter, base, tmp_path / "dora8.gguf", echo=lines.append, svd_rank=8)
    assert any("at rank 8;" in line for line in lines), lines
    assert any("--svd-rank R" in line and "-o svd_rank=R" in line for line in lines), lines  # the >5% hint
    assert all(higher.errors[m] < conversion.errors[m] for m in conversion.errors)
    got8 = llama_cpp_deltas(higher.path, base.config)
    assert all(np.linalg.matrix_rank(got8[name]) <= 8 for name in got8)
    full = convert_adapter(adapter, base, tmp_path / "dora-full.gguf", svd_rank=100_000)
    assert full.max_error < 1e-5


@pytest.mark.parametrize(
    ("domain", "said"),
    [
        ("head", "a LoRA of 'lm_head'"),
        ("saved", "trained whole weights of 'lm_head' (modules_to_save)"),
        ("embed", "a LoRA of the embedding 'model.embed_tokens'"),
    ],
)
def test_weights_outside_the_blocks_are_refused_with_merged_offered(
    registered, base_dir, tmp_path, domain, said
):
    from clara_plugin_gguf.adapter import convert_adapter, merged_deltas

    ws, made = registered
    adapter, base = records(ws, domain)
    with pytest.raises(InvalidInput) as caught:
        convert_adapter(adapter, base, tmp_path / "x.gguf")
    message = str(caught.value)
    assert said in message and "--merged" in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing half-written
    # --merged takes them: the exact deltas PEFT merges, the embedding's and lm_head's included
    deltas = merged_deltas(adapter, base)
    want = peft_deltas(base_dir, made[domain])
    # (PEFT's merge swaps in the trained copy of a modules_to_save weight: its delta is copy minus original)
    assert set(want) <= set(deltas) and ("lm_head" in want or domain == "embed")
    for module, delta in want.items():
        assert float((deltas[module].double() - delta).abs().max()) < 1e-5 * max(
            1.0, float(delta.abs().max())
        )


def test_the_cache_converts_once_per_checksum_and_refuses_changed_files(registered, tmp_path, monkeypatch):
    from clara_plugin_gguf import adapter as adapter_mod

    ws, _made = registered
    adapter, base = records(ws, "plain")
    path = adapter_mod.cached_adapter_gguf(adapter, base, tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / f"adapter-{adapter.adapter_checksum[:16]}.gguf"
    assert path.is_file()

    def fail(*_args, **_kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(adapter_mod, "convert_adapter", fail)
    assert adapter_mod.cached_adapter_gguf(adapter, base, tmp_path / "cache") == path
    monkeypatch.undo()

    # another SVD rank (the llamacpp engine's -o svd_rank) is another file, converted at that rank
    dora, _ = records(ws, "dora")
    own = adapter_mod.cached_adapter_gguf(dora, base, tmp_path / "cache")
    ranked = adapter_mod.cached_adapter_gguf(dora, base, tmp_path / "cache", svd_rank=8)
    import numpy as np

    assert own.name == f"adapter-{dora.adapter_checksum[:16]}.gguf"
    assert ranked.name == f"adapter-{dora.adapter_checksum[:16]}-svd8.gguf" and ranked.is_file()
    ranks = {n: np.linalg.matrix_rank(d) for n, d in llama_cpp_deltas(ranked, base.config).items()}
    assert max(ranks.values()) > 4 and max(ranks.values()) <= 8  # not the adapter's rank 4

    # the registered bytes decide: a file changed after registration is refused, nothing is written
    copy = Workspace.find(Path(shutil.copytree(ws.root, tmp_path / "ws")))
    changed, base = records(copy, "rs")
    weights = changed.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(Conflict, match="files changed since registration"):
        adapter_mod.cached_adapter_gguf(changed, base, tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "gguf").exists() or not list((tmp_path / "cache2" / "gguf").iterdir())


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"peft_type": "IA3"}, "is a IA3 adapter; the ollama export converts LoRA and DoRA adapters"),
        ({"fan_in_fan_out": True}, "uses fan_in_fan_out"),
        ({"bias": "lora_only"}, "trains biases (bias='lora_only'"),
    ],
)
def test_adapters_a_gguf_lora_cannot_express_are_refused_in_one_line(registered, tmp_path, change, said):
    from types import SimpleNamespace

    from clara_plugin_gguf.adapter import convert_adapter, merged_deltas

    from clara_core.plugin_api import adapter_checksum

    _ws, made = registered
    folder = Path(shutil.copytree(made["plain"], tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    adapter = SimpleNamespace(id="odd-lora-r4-v1", path=folder, adapter_checksum=adapter_checksum(folder))
    _, base = records(registered[0], "plain")
    for attempt in (
        lambda: convert_adapter(adapter, base, tmp_path / "x.gguf"),
        lambda: merged_deltas(adapter, base),
    ):
        with pytest.raises(InvalidInput) as caught:
            attempt()
        assert said in str(caught.value) and str(caught.value).startswith("adapter 'odd-lora-r4-v1'")
    assert not (tmp_path / "x.gguf").exists()
