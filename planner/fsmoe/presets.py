"""The three benchmark configurations of fsmoe.md as presets, and config files (JSON/YAML).

1. mixtral-8x7b: M=4096, H=14336, SwiGLU, E=8, k=2, f=1.2, B=4, L in {1024, 4096} (two configs).
2. gshard-grid:  M=1024, H in {1024, 4096}, E = #GPUs, k in {1, 2}, f in {1.0, 1.2}, B=8, L=2048 (eight configs).
3. fine-grained: E=64, k=6, M=2048, H=1408, one shared expert, dropless (B=4, L=2048 chosen by us).
Model depth for the gradient slicing: 32 MoE layers for Mixtral, 24 for the others (our choice, stated here).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from adasched.profiler.io import InputError, describe_validation_error, load_yaml, read_json, read_text, yaml_error_text

from .costmodel import MoEConfig

__all__ = ["PRESETS", "load_configs"]


def _mixtral(gpus: int) -> list[MoEConfig]:
    return [
        MoEConfig(name=f"mixtral-8x7b-L{L}", hidden=4096, ffn_hidden=14336, experts=8, top_k=2, capacity_factor=1.2,
                  batch=4, seq_len=L, activation="swiglu", num_layers=32)
        for L in (1024, 4096)
    ]


def _gshard(gpus: int) -> list[MoEConfig]:
    out = []
    for H in (1024, 4096):
        for k in (1, 2):
            for f in (1.0, 1.2):
                out.append(MoEConfig(name=f"gshard-H{H}-k{k}-f{f}", hidden=1024, ffn_hidden=H, experts=max(gpus, k),
                                     top_k=k, capacity_factor=f, batch=8, seq_len=2048, activation="gelu", num_layers=24))
    return out


def _fine(gpus: int) -> list[MoEConfig]:
    return [MoEConfig(name="fine-grained-e64-k6", hidden=2048, ffn_hidden=1408, experts=64, top_k=6, capacity_factor=1.0,
                      batch=4, seq_len=2048, activation="swiglu", shared_experts=1, dropless=True, num_layers=24)]


PRESETS = {"mixtral-8x7b": _mixtral, "gshard-grid": _gshard, "fine-grained": _fine}


def load_configs(name_or_path: str, gpus: int) -> list[MoEConfig]:
    """A preset name, or a JSON/YAML file holding one config object or a list of them."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path](gpus)
    path = Path(name_or_path)
    if not path.exists():
        raise InputError("--config", f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = load_yaml(read_text(path, expected="a JSON or YAML config file"))
        except yaml.YAMLError as err:
            raise InputError(path, yaml_error_text(err)) from None
    else:
        data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("kind"), str) and "schema_version" in data:
        # an adasched plan or profile given as --config: "[0].name: Field required (and 18 more)" said nothing useful
        raise InputError(path, f"is an adasched {data['kind']!r} file, not an MoE config file (a config holds "
                               f"hidden, ffn_hidden, experts, top_k, ...; an MoE plan is read by train_moe --plan)")
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InputError(path, "no configurations in file")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(path, f"[{i}]: expected an object")
        try:
            out.append(MoEConfig.model_validate(item))
        except ValidationError as err:
            raise InputError(path, f"[{i}].{describe_validation_error(err)}") from None
        first = next((j for j, c in enumerate(out[:-1]) if c.name == out[-1].name), None)
        if first is not None:  # the plan's rows (and train_moe --plan-config NAME) are found by name
            raise InputError(path, f"[{i}].name: {out[-1].name!r} is also the name of [{first}]")
    return out
