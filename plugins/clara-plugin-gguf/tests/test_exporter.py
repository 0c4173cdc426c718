"""The ollama exporter end to end on a tiny Llama, loaded back with llama-cpp-python: a LoRA, an rsLoRA with
alpha and rank patterns, a composite and merged variants compute what transformers + PEFT compute (logits within
the outtype's tolerance, top-1 agreeing wherever the logits allow); DoRA within its recorded SVD error; and
every refusal (lm_head, verification failures) clear and leaving the evidence for the core to keep aside."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip(
    "gguf", reason="the GGUF export needs the gguf package (pip install -e plugins/clara-plugin-gguf)"
)
pytest.importorskip(
    "llama_cpp",
    reason="verification loads the export with llama-cpp-python (pip install -e plugins/clara-plugin-gguf)",
)
pytest.importorskip("peft", reason="the reference is transformers + PEFT")

from clara_core.cli import ClaraContext, cli
from clara_core.plugin_api import ExportRejected, ExportRequest, InvalidInput
from clara_core.plugins import PluginManager
from clara_core.registry import Registry
from clara_core.workspace import Workspace

ADAPTERS = {
    "plain": {"seed": 11, "rank": 4},
    "rs": {
        "seed": 12,
        "rank": 8,
        "use_rslora": True,
        "alpha_pattern": {"v_proj": 3.0},
        "rank_pattern": {"o_proj": 2},
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
    },
    "dora": {"seed": 13, "rank": 4, "use_dora": True, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "head": {"seed": 14, "rank": 4, "target_modules": ["q_proj", "lm_head"]},
}


def plugins() -> PluginManager:
    manager = PluginManager(load_entry_points=False)
    for module, dist in (
        ("clara_plugin_merge", "clara-plugin-merge"),
        ("clara_plugin_gguf", "clara-plugin-gguf"),
    ):
        manager.register(importlib.import_module(module), name=dist.rsplit("-", 1)[-1], distribution=dist)
    return manager


def cli_run(ws: Workspace, *args: str):
    return CliRunner().invoke(cli, list(args), obj=ClaraContext(workspace=ws.root, plugins=plugins()))


@pytest.fixture(scope="module")
def registered(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, make_adapter: Callable[..., Path]
) -> Workspace:
    root = tmp_path_factory.mktemp("gguf-export")
    base_dir = tiny_llama_dir
    ws, _ = Workspace.init(root / "ws")
    assert cli_run(ws, "base", "add", str(base_dir), "--name", "tiny").exit_code == 0
    for domain, kwargs in ADAPTERS.items():
        folder = make_adapter(base_dir, root / "made" / domain, **kwargs)
        result = cli_run(ws, "adapters", "register", str(folder), "--domain", domain, "--base", "tiny")
        assert result.exit_code == 0, result.output
    return ws


def records(ws: Workspace, domain: str):
    with Registry.open(ws.registry_path) as registry:
        adapter = next(a for a in registry.list_adapters() if a.domain == [domain])
        return adapter, registry.get_base("tiny")


def export(ws: Workspace, adapter, base, out: Path, lines: list[str] | None = None, **options):
    from clara_plugin_gguf.exporter import OllamaExporter

    request = ExportRequest(
        adapter=adapter, base=base, out_dir=out, options=options, name="", cache_dir=ws.root / "models" / "cache",
        echo=(lines.append if lines is not None else lambda _line: None),
    )  # fmt: skip
    return OllamaExporter().export(request)


def assert_verified(details: dict, outtype: str) -> dict:
    from clara_plugin_gguf.verify import TOLERANCES

    check = details["verification"]
    assert check["passed"] is True
    assert check["outtype"] == outtype
    assert check["max_abs_diff"] <= check["allowed"]
    assert (
        check["decisive"] > 0 and check["decisive_disagreements"] == 0
    )  # top-1 agrees where it is clear-cut
    if check["svd_logit_diff"] is None:
        assert check["allowed"] == pytest.approx(TOLERANCES[outtype] * check["logit_scale"])
    return check


@pytest.mark.parametrize(("domain", "outtype"), [("plain", "f16"), ("rs", "f32")])
def test_adapter_export_matches_transformers_and_peft(registered, tmp_path, domain, outtype):
    adapter, base = records(registered, domain)
    lines: list[str] = []
    result = export(registered, adapter, base, tmp_path / "out", lines, outtype=outtype)
    names = [f.name for f in result.files]
    assert names == [f"tiny.{outtype}.gguf", f"{adapter.id}.lora.gguf", "Modelfile"]
    assert all(f.parent == tmp_path / "out" and f.is_file() for f in result.files)
    check = assert_verified(result.details, outtype)
    assert check["top1_agreement"] >= 0.9
    if outtype == "f32":  # exact: only float32 rounding is left
        assert check["max_abs_diff"] < 1e-4 * check["logit_scale"]
    assert result.details["method"] == "exact" and result.details["merged"] is False
    assert result.details["adapter_checksum"] == adapter.adapter_checksum
    assert result.details["base_model_hash"] == base.base_model_hash
    json.dumps(result.details)  # the core records it as JSON
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./tiny.{outtype}.gguf\nADAPTER ./{adapter.id}.lora.gguf\n" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>' in modelfile
    assert result.message.endswith(f"ollama create {adapter.id} -f Modelfile")
    assert any(line.startswith("Compared with transformers + PEFT adapter") for line in lines)
    # the base GGUF is the cached one, linked (not rebuilt, not copied) into the export
    cached = next((registered.root / "models" / "cache" / "gguf").glob(f"*{outtype}*.gguf"))
    assert os.path.samefile(cached, tmp_path / "out" / f"tiny.{outtype}.gguf")


def test_composite_export_matches(registered, tmp_path):
    ws = Workspace.find(Path(shutil.copytree(registered.root, tmp_path / "ws")))
    plain, _ = records(ws, "plain")
    rs, _ = records(ws, "rs")
    result = cli_run(
        ws, "composite", "build", "--adapters", plain.id, rs.id, "--strategy", "weighted", "--weights", "0.6", "0.8",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Registry.open(ws.registry_path) as registry:
        composite = registry.get_adapter(json.loads(result.stdout)["id"])
        base = registry.get_base("tiny")
    exported = export(ws, composite, base, tmp_path / "out")
    assert exported.details["method"] == "exact"
    assert_verified(exported.details, "f16")


def test_merged_export_is_one_gguf_that_matches(registered, tmp_path):
    adapter, base = records(registered, "rs")
    result = export(registered, adapter, base, tmp_path / "out", merged=True)
    assert [f.name for f in result.files] == [f"{adapter.id}.f16.gguf", "Modelfile"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./{adapter.id}.f16.gguf\n" in modelfile and "ADAPTER" not in modelfile
    assert result.details["method"] == "merged"
    assert "merged" in assert_verified(result.details, "f16")["reference"]


def test_dora_export_is_within_its_recorded_error_and_exact_when_merged(registered, tmp_path):
    adapter, base = records(registered, "dora")
    lines: list[str] = []
    result = export(registered, adapter, base, tmp_path / "svd", lines)
    details = result.details
    assert details["method"] == "svd"
    assert len(details["svd_errors"]) == 2 * 3 and details["svd_max_error"] == max(
        details["svd_errors"].values()
    )
    assert any(line.startswith("DoRA: 6 module(s)") for line in lines)  # printed, not only recorded
    check = assert_verified(details, "f16")
    # the files are the exported factors to within f16; the SVD's own effect is measured and allowed on top
    assert check["conversion_diff"] <= check["conversion_allowed"]
    from clara_plugin_gguf.verify import TOLERANCES

    allowed = TOLERANCES["f16"] * check["logit_scale"] + check["svd_logit_diff"]
    assert check["allowed"] == pytest.approx(allowed, rel=1e-9)
    assert check["svd_logit_diff"] > 0
    merged = export(registered, adapter, base, tmp_path / "merged", merged=True)
    exact = assert_verified(merged.details, "f16")
    assert exact["svd_logit_diff"] is None and exact["max_abs_diff"] < check["svd_logit_diff"]
    # a higher SVD rank: verified, recorded, closer to the DoRA model
    higher = export(registered, adapter, base, tmp_path / "svd8", svd_rank=8)
    assert higher.details["svd_rank"] == 8 and details["svd_rank"] == "the adapter's"
    assert higher.details["svd_max_error"] < details["svd_max_error"]
    assert assert_verified(higher.details, "f16")["svd_logit_diff"] < check["svd_logit_diff"]


def test_svd_rank_is_an_option_of_the_command_and_a_negative_one_is_one_line(registered):
    adapter, _ = records(registered, "dora")
    assert "--svd-rank" in cli_run(registered, "export", "ollama", "--help").output
    result = cli_run(registered, "export", "ollama", adapter.id, "--svd-rank", "-1", "--no-verify")
    assert result.exit_code != 0
    assert "--svd-rank -1: give a positive rank" in result.output and "Traceback" not in result.output
    assert not (registered.root / "models" / "exports" / adapter.id).exists()


def test_lm_head_adapter_is_refused_before_any_conversion_and_exports_merged(
    registered, tmp_path, monkeypatch
):
    from clara_plugin_gguf import base as gguf_base

    def no_base(*_args, **_kwargs):
        raise AssertionError("the base was converted before the adapter was refused")

    adapter, base = records(registered, "head")
    with monkeypatch.context() as patch:
        patch.setattr(gguf_base, "cached_base_gguf", no_base)
        patch.setattr(gguf_base, "convert_base", no_base)
        with pytest.raises(InvalidInput, match=r"a LoRA of 'lm_head'.*add --merged"):
            export(registered, adapter, base, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
    result = export(registered, adapter, base, tmp_path / "merged", merged=True)  # the way out works
    assert_verified(result.details, "f16")


def test_verification_failure_raises_export_rejected_and_leaves_the_files(registered, tmp_path, monkeypatch):
    from clara_plugin_gguf import adapter as adapter_mod

    adapter, base = records(registered, "plain")
    real = adapter_mod.lora_scaling
    # a conversion bug: q_proj's scale folded in twice
    monkeypatch.setattr(
        adapter_mod, "lora_scaling", lambda c, m, r: real(c, m, r) * (2.0 if m.endswith("q_proj") else 1.0)
    )
    with pytest.raises(ExportRejected, match=r"verification failed: .*max \|logit difference\|") as caught:
        export(registered, adapter, base, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["tiny.f16.gguf", f"{adapter.id}.lora.gguf", "Modelfile"]
    )  # everything stays for the core to keep aside as NAME.rejected-<time>
    monkeypatch.undo()
    from clara_plugin_gguf import verify

    monkeypatch.setitem(verify.TOLERANCES, "f16", 0.0)  # an honest export, an impossible tolerance
    with pytest.raises(ExportRejected, match="allowed 0.00e"):
        export(registered, adapter, base, tmp_path / "out2")


def test_no_verify_skips_llama_cpp_and_create_runs_ollama(registered, tmp_path, monkeypatch):
    from clara_plugin_gguf import verify

    def refuse(*_args, **_kwargs):
        raise AssertionError("verification ran")

    monkeypatch.setattr(verify, "verify_export", refuse)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = bin_dir / "calls.txt"
    script = bin_dir / "ollama"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    adapter, base = records(registered, "plain")
    result = export(registered, adapter, base, tmp_path / "out", verify=False, create=True)
    assert result.details["verification"] is None
    assert calls.read_text() == f"create {adapter.id} -f Modelfile"
    assert result.message.startswith(f"Created the Ollama model '{adapter.id}'")


def test_registration_declares_the_options_with_tolerances_in_help():
    import click

    exporter = plugins().exporter("ollama")
    options = {o.name: o for o in exporter.options}
    assert set(options) == {"merged", "outtype", "verify", "svd_rank", "create"}
    assert options["svd_rank"].default == 0 and options["svd_rank"].type is int
    assert options["outtype"].default == "f16" and options["outtype"].choices == (
        "f32",
        "f16",
        "bf16",
        "q8_0",
    )
    assert options["verify"].default is True
    flag = options["verify"].click_option()
    assert isinstance(flag, click.Option) and "--no-verify" in flag.secondary_opts
    assert "f16 0.01" in options["outtype"].help and "q8_0 0.1" in options["outtype"].help
    assert exporter.create().__class__.__name__ == "OllamaExporter"


@pytest.fixture(scope="module")
def qwen2_registered(
    tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path, make_adapter: Callable[..., Path]
) -> Workspace:
    """Qwen2 (biases, tied embeddings, no rotary row reorder) with a LoRA, and a LoRA of its embedding (which
    the base's lm_head shares; clara refuses to register a LoRA of a tied lm_head, which has no weight)."""
    root = tmp_path_factory.mktemp("gguf-export-qwen2")
    ws, _ = Workspace.init(root / "ws")
    assert cli_run(ws, "base", "add", str(tiny_qwen2_dir), "--name", "tiny").exit_code == 0
    for domain, kwargs in {
        "plain": {"seed": 21, "rank": 4},
        "embed": {"seed": 23, "rank": 4, "target_modules": ["v_proj", "embed_tokens"]},
    }.items():
        folder = make_adapter(tiny_qwen2_dir, root / "made" / domain, **kwargs)
        result = cli_run(ws, "adapters", "register", str(folder), "--domain", domain, "--base", "tiny")
        assert result.exit_code == 0, result.output
    return ws


def test_qwen2_adapter_and_merged_embedding_of_a_tied_base_match(qwen2_registered, tmp_path):
    adapter, base = records(qwen2_registered, "plain")
    assert base.config["tie_word_embeddings"] is True
    result = export(qwen2_registered, adapter, base, tmp_path / "plain", outtype="f32")
    check = assert_verified(result.details, "f32")
    assert check["max_abs_diff"] < 1e-4 * check["logit_scale"]
    # the embedding changes, the tied output matrix must not: it gets its own, unchanged copy
    adapter, base = records(qwen2_registered, "embed")
    with pytest.raises(InvalidInput, match="--merged"):
        export(qwen2_registered, adapter, base, tmp_path / "embed-refused")
    result = export(qwen2_registered, adapter, base, tmp_path / "embed", merged=True, outtype="f32")
    check = assert_verified(result.details, "f32")
    assert check["max_abs_diff"] < 1e-4 * check["logit_scale"]


def test_an_unsupported_architecture_is_named_with_the_supported_ones(registered, tmp_path):
    import attrs

    adapter, base = records(registered, "plain")
    gpt2 = attrs.evolve(base, model_type="gpt2", config={**base.config, "model_type": "gpt2"})
    with pytest.raises(
        InvalidInput, match=r"architecture 'gpt2' cannot be exported to GGUF .*supported: llama"
    ):
        export(registered, adapter, gpt2, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_the_cli_registers_a_verified_export_and_keeps_a_rejected_one_aside(
    registered, tmp_path, monkeypatch
):
    from clara_plugin_gguf import verify

    ws = Workspace.find(Path(shutil.copytree(registered.root, tmp_path / "ws")))
    adapter, _ = records(ws, "rs")
    result = cli_run(ws, "export", "ollama", adapter.id, "--outtype", "f32", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    assert entry["name"] == f"{adapter.id}-f32"  # the core's default: the id and the non-default options
    assert [f["path"] for f in entry["files"]] == ["tiny.f32.gguf", f"{entry['name']}.lora.gguf", "Modelfile"]
    assert entry["details"]["verification"]["passed"] is True
    assert entry["details"]["adapter_checksum"] == adapter.adapter_checksum
    assert "Compared with transformers" in result.stderr and "Loading weights" not in result.stderr

    monkeypatch.setitem(verify.TOLERANCES, "f16", 0.0)
    result = cli_run(ws, "export", "ollama", adapter.id, "--name", "strict")
    assert result.exit_code != 0
    assert "verification failed" in result.output and "Traceback" not in result.output
    kept = [p.name for p in ws.exports_dir.iterdir() if p.name.startswith("strict.rejected-")]
    assert len(kept) == 1 and (ws.exports_dir / kept[0] / "Modelfile").is_file()
    listed = json.loads(cli_run(ws, "export", "list", "--json").stdout)
    assert [e["name"] for e in listed] == [entry["name"]]  # the rejected one is not registered


@pytest.fixture(scope="module")
def merged_ws(registered: Workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, str]:
    """A copy of the workspace with a merged model: 'plain' and 'rs' added into the base's weights."""
    ws = Workspace.find(Path(shutil.copytree(registered.root, tmp_path_factory.mktemp("merged") / "ws")))
    plain, _ = records(ws, "plain")
    rs, _ = records(ws, "rs")
    result = cli_run(
        ws, "composite", "build", "--adapters", plain.id, rs.id, "--strategy", "additive", "--merge-into-base",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return ws, json.loads(result.stdout)["id"]


def test_a_merged_model_exports_as_one_gguf_that_computes_what_its_folder_computes(
    merged_ws, tmp_path, hf_logits, gguf_logits
):
    ws, merged_id = merged_ws
    with Registry.open(ws.registry_path) as registry:
        merged = registry.get_adapter(merged_id)
        base = registry.get_base("tiny")
    assert merged.kind == "merged"
    # the tokenizer comes from the registered base: the export needs none in the merged folder
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (merged.path / name).unlink(missing_ok=True)
    cache = ws.root / "models" / "cache" / "gguf"
    cached_before = sorted(cache.glob("*.gguf")) if cache.is_dir() else []
    result = cli_run(ws, "export", "ollama", merged_id, "--outtype", "f32", "--json")
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.stderr  # transformers' progress bars are off during verification
    entry = json.loads(result.stdout)
    gguf_name = f"{entry['name']}.f32.gguf"
    assert [f["path"] for f in entry["files"]] == [gguf_name, "Modelfile"]
    folder = Path(entry["path"])
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf_name}\n" in modelfile and "ADAPTER" not in modelfile
    assert 'TEMPLATE """' in modelfile  # the base's chat template
    details = entry["details"]
    assert details["merged"] is True and details["method"] == "merged model"
    assert details["adapter_checksum"] == merged.adapter_checksum == details["merged_model_hash"]
    assert entry["adapter_checksum"] == merged.adapter_checksum
    assert entry["base_model_hash"] == details["base_model_hash"] == base.base_model_hash
    assert [c["id"] for c in details["components"]] == [
        c["id"] for c in merged.training_config["composite"]["components"]
    ]
    assert details["strategy"] == "additive"
    check = assert_verified(details, "f32")
    assert check["reference"] == f"transformers loading the merged model '{merged_id}' (no PEFT)"
    assert check["max_abs_diff"] < 1e-4 * check["logit_scale"]
    # independently: llama.cpp on the export against transformers on the merged folder and on the base
    from transformers import AutoTokenizer

    ids = list(
        AutoTokenizer.from_pretrained(str(base.path))("Der Einspruch ist innerhalb eines Monats")["input_ids"]
    )
    exported = gguf_logits(folder / gguf_name, ids)
    reference = hf_logits(merged.path, ids)
    assert abs(exported - reference).max() < 1e-4 * abs(reference).max()
    assert abs(hf_logits(base.path, ids) - reference).max() > 100 * abs(exported - reference).max()
    # the merged model is converted into the export alone: nothing is cached, least of all under the base's hash
    assert (sorted(cache.glob("*.gguf")) if cache.is_dir() else []) == cached_before
    listed = json.loads(cli_run(ws, "export", "list", "--json").stdout)
    assert [e["name"] for e in listed if e["adapter_id"] == merged_id] == [entry["name"]]
    # --merged on a merged model is accepted and changes nothing but the default name
    again = cli_run(ws, "export", "ollama", merged_id, "--merged", "--no-verify", "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["name"] == f"{merged_id}-merged-no-verify"
    assert [f["path"] for f in second["files"]] == [f"{second['name']}.f16.gguf", "Modelfile"]


def test_a_merged_model_has_no_lora_form_and_changed_files_are_refused(merged_ws, tmp_path):
    from clara_plugin_gguf.adapter import convert_adapter

    ws, merged_id = merged_ws
    with Registry.open(ws.registry_path) as registry:
        merged = registry.get_adapter(merged_id)
        base = registry.get_base("tiny")
    # the adapter conversion (the engine's, and the exporter's for adapters) says where the way is
    with pytest.raises(
        InvalidInput, match=rf"not an adapter with LoRA factors; 'clara export ollama {merged_id}'"
    ):
        convert_adapter(merged, base, tmp_path / "x.lora.gguf")
    ws = Workspace.find(Path(shutil.copytree(ws.root, tmp_path / "ws")))
    with Registry.open(ws.registry_path) as registry:
        folder = registry.get_adapter(merged_id).path
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    result = cli_run(ws, "export", "ollama", merged_id, "--name", "changed")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"merged model '{merged_id}': the files in" in result.output
    assert f"clara adapters verify {merged_id}" in result.output
    assert not (ws.exports_dir / "changed").exists()
    assert not [p for p in ws.exports_dir.glob("changed*")] if ws.exports_dir.exists() else True
    names = [e["name"] for e in json.loads(cli_run(ws, "export", "list", "--json").stdout)]
    assert "changed" not in names


def test_missing_llama_cpp_python_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    from clara_plugin_gguf import verify

    from clara_core.plugin_api import ClaraError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ClaraError) as caught:
        verify.gguf_logits(tmp_path / "m.gguf", None, [[1, 2, 3]])
    message = str(caught.value)
    assert "pip install llama-cpp-python" in message and "--no-verify" in message and "\n" not in message
    assert not isinstance(caught.value, ExportRejected)  # nothing wrong with the files: not kept aside


def test_a_base_without_tokenizer_is_refused_before_anything_is_written(registered, tmp_path):
    import attrs

    adapter, base = records(registered, "plain")
    folder = Path(shutil.copytree(base.path, tmp_path / "no-tokenizer"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidInput, match="has no tokenizer"):
        export(registered, adapter, attrs.evolve(base, path=folder), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
