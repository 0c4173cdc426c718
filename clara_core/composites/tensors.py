"""The tensor side of composites: components' deltas read from their verified bytes, base weights read from
safetensors (only the modules asked for), strategies' answers turned into stored low-rank factors with the
error of every compression measured against the exact merged delta.

Imports torch and safetensors at call time only (``clara composite --help`` must stay light).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidInput
from ..types import MergedModule, ModuleDelta

PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_M_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")
#: adapter_config.json settings a composite cannot reproduce from A, B and the magnitude alone.
_UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save (trained copies of whole modules)",
    "lora_bias": "lora_bias (a trained bias in lora_B)",
}


@attrs.define
class ComponentWeights:
    """One component adapter's tensors, by module name in the base (``model.layers.0.self_attn.q_proj``)."""

    adapter_id: str
    config: dict
    lora_A: dict[str, Any]
    lora_B: dict[str, Any]
    magnitude: dict[str, Any]
    scaling: dict[str, float]
    #: trained bias vectors of the base's layers (PEFT ``bias="all"`` / ``"lora_only"``), read only on request
    bias: dict[str, Any] = attrs.field(factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_A)

    def delta(self, module: str, weight: float) -> ModuleDelta:
        return ModuleDelta(
            self.adapter_id,
            lora_A=self.lora_A[module],
            lora_B=self.lora_B[module],
            scaling=self.scaling[module],
            magnitude=self.magnitude.get(module),
            weight=weight,
        )

    def rank(self, module: str) -> int:
        return int(self.lora_A[module].shape[0])


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling of ``module``: alpha/r, or alpha/sqrt(r) for rsLoRA, with the patterns honoured."""
    default_alpha = config.get("lora_alpha")
    default_alpha = 8 if default_alpha is None else default_alpha  # PEFT's default; an explicit 0 stays 0
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, default_alpha))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def parse_component(
    adapter_id: str, config: dict, weights: bytes, *, biases: bool = False
) -> ComponentWeights:
    """Split a PEFT LoRA/DoRA state dict (the verified bytes) into per-module A, B and magnitude; with
    ``biases``, trained bias vectors (``...q_proj.base_layer.bias`` or ``...k_proj.bias``) by module too."""
    from safetensors.torch import load

    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidInput(
            f"adapter '{adapter_id}' is a {config.get('peft_type')} adapter; composites combine LoRA and DoRA"
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidInput(f"adapter '{adapter_id}' uses {what}, which a composite cannot carry over")
    tensors = load(weights)
    found: dict[str, dict[str, Any]] = {"A": {}, "B": {}, "M": {}, "bias": {}}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(_A_SUFFIX):
            found["A"][name[: -len(_A_SUFFIX)]] = tensor
        elif name.endswith(_B_SUFFIX):
            found["B"][name[: -len(_B_SUFFIX)]] = tensor
        elif name.endswith(_M_SUFFIXES):
            suffix = next(s for s in _M_SUFFIXES if name.endswith(s))
            found["M"][name[: -len(suffix)]] = tensor
        elif biases and name.endswith(".bias"):
            found["bias"][name.removesuffix(".bias").removesuffix(".base_layer")] = tensor
        else:
            raise InvalidInput(
                f"adapter '{adapter_id}' holds '{key}', which is not a LoRA factor or DoRA magnitude; "
                "composites combine plain LoRA and DoRA adapters of linear layers"
            )
    if set(found["A"]) != set(found["B"]) or not set(found["M"]) <= set(found["A"]):
        raise InvalidInput(
            f"adapter '{adapter_id}' has lora_A, lora_B and magnitude tensors for different modules"
        )
    if not found["A"]:
        raise InvalidInput(f"adapter '{adapter_id}' holds no LoRA weights")
    scaling = {
        module: module_scaling(config, module, int(a.shape[0])) for module, a in sorted(found["A"].items())
    }
    return ComponentWeights(adapter_id, config, found["A"], found["B"], found["M"], scaling, found["bias"])


def load_base_weights(base_path: Path, modules: Iterable[str]) -> dict[str, Any]:
    """The dense weights ``[out, in]`` of ``modules`` from the base's safetensors files (only those tensors)."""
    from safetensors import safe_open

    wanted = {f"{m}.weight": m for m in modules}
    out: dict[str, Any] = {}
    for file in sorted(Path(base_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key in wanted:
                    out[wanted[key]] = handle.get_tensor(key).float()
    missing = sorted(set(wanted.values()) - set(out))
    if missing:
        raise InvalidInput(
            f"base in {base_path} has no weight for {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            + "; the adapters do not fit this base"
        )
    return out


@attrs.define
class StoredModule:
    """What a composite stores for one module: factors at scaling 1, and how far they are from exact."""

    lora_A: Any
    lora_B: Any
    exact: bool
    #: ``||D - B A||_F / ||D||_F`` against the exact merged delta ``D`` (0.0 where stored exactly).
    error: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


def exact_delta(merged: MergedModule, base_weight: Any) -> Any:
    """The dense delta a strategy's answer stands for, in float64 (DoRA magnitude applied against the base)."""
    import torch

    if merged.dense_delta is not None:
        delta = merged.dense_delta.to(torch.float64)
    else:
        delta = merged.lora_B.to(torch.float64) @ merged.lora_A.to(torch.float64)
    if merged.magnitude is None:
        return delta
    if base_weight is None:
        raise ValueError("a merged module with a DoRA magnitude needs the base weight")
    weight = base_weight.to(torch.float64)
    combined = weight + delta
    norm = combined.norm(p=2, dim=1, keepdim=True)
    return (merged.magnitude.to(torch.float64).reshape(-1, 1) / norm) * combined - weight


def _relative_error(delta: Any, lora_A: Any, lora_B: Any) -> float:
    import torch

    reference = float(delta.norm())
    if reference == 0.0:
        return 0.0
    approx = lora_B.to(torch.float64) @ lora_A.to(torch.float64)
    return float((delta - approx).norm()) / reference


def _svd_factors(delta: Any, rank: int) -> tuple[Any, Any]:
    """Truncated SVD of the float64 ``delta`` as balanced factors ``(A [rank, in], B [out, rank])``."""
    import torch

    # float32 for speed (the dense SVD is the one costly step of a DoRA composite); the recorded error is
    # measured afterwards in float64 against the exact delta, so it stays truthful
    matrix = delta.float()
    smaller = min(matrix.shape)
    rank = min(rank, smaller)
    probes = rank + _SVD_OVERSAMPLE
    if probes * 2 <= smaller:
        # randomized SVD (Halko et al.) with power iterations: for the leading `rank` directions it finds the
        # truncated SVD's error to 1e-9 here at a quarter of the time of the full SVD; seeded, so the same
        # inputs give the same factors (and the same composite checksum) whatever the caller's random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=probes, niter=_SVD_POWER_ITERATIONS)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return root.reshape(-1, 1) * vh[:rank], u[:, :rank] * root


#: Extra random probes and power iterations of the randomized SVD in :func:`_svd_factors`.
_SVD_OVERSAMPLE = 8
_SVD_POWER_ITERATIONS = 4


def _factored_svd(lora_A: Any, lora_B: Any, rank: int) -> tuple[Any, Any]:
    """Truncated SVD of ``B @ A`` without forming it: QR of both factors, SVD of the small core."""
    import torch

    qb, rb = torch.linalg.qr(lora_B.to(torch.float64))
    qa, ra = torch.linalg.qr(lora_A.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    rank = min(rank, int(s.shape[0]))
    root = s[:rank].sqrt()
    return root.reshape(-1, 1) * (vh[:rank] @ qa.T), (qb @ u[:, :rank]) * root


def store_module(
    merged: MergedModule, base_weight: Any, rank: int | None, default_rank: int, dtype: Any
) -> StoredModule:
    """Turn a strategy's answer into stored factors.

    Factors without a magnitude are kept exactly unless ``rank`` asks for fewer; everything else (a dense
    delta, a DoRA magnitude) is the truncated SVD of the exact delta at ``rank`` (default ``default_rank``).
    The error is always measured against the exact delta, in float64.
    """
    delta = exact_delta(merged, base_weight)
    if merged.dense_delta is None and merged.magnitude is None:
        exact_rank = int(merged.lora_A.shape[0])
        if rank is None or rank >= exact_rank:
            return StoredModule(
                merged.lora_A.to(dtype).contiguous(), merged.lora_B.to(dtype).contiguous(), True, 0.0
            )
        lora_A, lora_B = _factored_svd(merged.lora_A, merged.lora_B, rank)
    else:
        lora_A, lora_B = _svd_factors(delta, rank or default_rank)
    lora_A, lora_B = lora_A.to(dtype).contiguous(), lora_B.to(dtype).contiguous()
    return StoredModule(lora_A, lora_B, False, _relative_error(delta, lora_A, lora_B))


def delta_norm_shares(deltas: Sequence[ModuleDelta], base_weight: Any) -> list[float]:
    """Each component's share of the weighted delta norm at one module (the layer-conflict warning)."""
    norms = [abs(d.weight) * float(d.dense(base_weight).norm()) for d in deltas]
    total = sum(norms)
    return [n / total if total else 0.0 for n in norms]


def peft_config(
    stored: Mapping[str, StoredModule], base_model_name_or_path: str | None, base_module_names: Iterable[str]
) -> dict[str, Any]:
    """A plain PEFT LoRA ``adapter_config.json`` for ``stored``: scaling 1 everywhere (``lora_alpha = r``, and
    ``rank_pattern``/``alpha_pattern`` for modules of another rank)."""
    ranks = {module: s.rank for module, s in stored.items()}
    r = max(ranks.values())
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in stored})
    covered = all(m in stored for m in base_module_names if m.rsplit(".", 1)[-1] in suffixes)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        # every module of these names is stored: the short names, as trained adapters have them; otherwise
        # the exact module names, so that no module gets an empty LoRA layer
        "target_modules": suffixes if covered else sorted(stored),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def state_dict(stored: Mapping[str, StoredModule]) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for module, s in sorted(stored.items()):
        tensors[f"{PEFT_PREFIX}{module}{_A_SUFFIX}"] = s.lora_A
        tensors[f"{PEFT_PREFIX}{module}{_B_SUFFIX}"] = s.lora_B
    return tensors


def base_linear_names(base_path: Path) -> list[str]:
    """Names of the base's 2-D weights (module names, without ``.weight``), read from the safetensors headers."""
    from safetensors import safe_open

    names = []
    for file in sorted(Path(base_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2:
                    names.append(key[: -len(".weight")])
    return names


def write_merged_model(base_path: Path, deltas: Mapping[str, Any], folder: Path) -> None:
    """A full model folder: the base's files, with ``deltas`` (float64, by module) added to their weights in
    each weight's own dtype. Weight files keep their names (and the shard index), so it loads like the base."""
    import shutil

    from safetensors.torch import load_file, save_file

    remaining = dict(deltas)
    for file in sorted(Path(base_path).iterdir()):
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
            for key, tensor in tensors.items():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if module in remaining:
                    delta = remaining.pop(module)
                    tensors[key] = (tensor.double() + delta).to(tensor.dtype).contiguous()
            save_file(tensors, str(folder / file.name), metadata={"format": "pt"})
        elif file.is_file():
            shutil.copy2(file, folder / file.name)
    if remaining:
        raise InvalidInput(f"base in {base_path} has no weight for {', '.join(sorted(remaining)[:3])}")
