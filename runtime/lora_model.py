"""A tiny Llama-style causal LM (frozen base) with any number of LoRA adapters, for CPU training and tests.

Two forward paths over the same frozen weights:

- :meth:`TinyCausalLM.forward` (``input_ids`` [B, L] -> logits [B, L, V]) calls every projection as a plain
  ``nn.Linear`` module, so ``peft`` can wrap the model (``get_peft_model`` / ``PeftModel.from_pretrained``);
- :meth:`TinyCausalLM.forward_packed` runs a packed microbatch (tokens of several samples, possibly of several
  adapters, concatenated; block-diagonal causal attention, positions restart per sample) over a layer range and
  routes every projection through a ``proj(path, module, x)`` callback: the trainer plugs the fused multi-LoRA
  kernel (or its torch reference) in there.

Module paths match PEFT's naming: ``layers.{i}.self_attn.{q,k,v,o}_proj`` and ``layers.{i}.mlp.{gate,up,down}_proj``.
:class:`LoRAAdapter` holds one job's A/B matrices keyed by those paths and reads/writes PEFT's adapter format.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from adasched.planner.lorafusion.plan import KNOWN_TARGET_MODULES, AdapterSpec  # plan model only
from adasched.profiler.io import atomic_path, atomic_write_text

__all__ = ["TinyLMConfig", "TinyCausalLM", "LoRAAdapter", "save_peft_adapter", "Proj", "plain_proj", "ATTN_MODULES",
           "MLP_MODULES", "seed64"]

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
assert set(ATTN_MODULES + MLP_MODULES) == set(KNOWN_TARGET_MODULES)

Proj = Callable[[str, nn.Linear, torch.Tensor], torch.Tensor]
"""proj(module path, frozen nn.Linear, x [T, K]) -> [T, N]"""


def seed64(x: int) -> int:
    """``x`` folded into ``torch.Generator.manual_seed``'s range [-2**63, 2**64) (``x`` itself when it is in range):
    seeds derived as ``seed * big + i`` overflowed it for --seed >= ~2**44 ("Overflow when unpacking long long")."""
    x = int(x)
    return x if -2 ** 63 <= x < 2 ** 64 else x % 2 ** 64


def plain_proj(path: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    vocab_size: int = 64
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    ffn_hidden: int = 48
    max_positions: int = 512
    """longest sample (tokens) the learned position table covers"""
    seed: int = 0
    """seeds the frozen base weights: the same config gives the same model in every process"""

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        for f in ("vocab_size", "hidden", "layers", "heads", "ffn_hidden", "max_positions"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")


class _Attention(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        h = cfg.hidden
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=False)


class _Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.input_norm = nn.LayerNorm(cfg.hidden)
        self.self_attn = _Attention(cfg)
        self.post_norm = nn.LayerNorm(cfg.hidden)
        self.mlp = _MLP(cfg)


class TinyCausalLM(nn.Module):
    """Embedding + learned positions, pre-norm blocks (MHA, SwiGLU MLP), final norm, LM head. All frozen."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed64(cfg.seed))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("norm.bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        self.requires_grad_(False)

    # ---- shared pieces ------------------------------------------------------------------------------
    def _block(self, i: int, h: torch.Tensor, seq_lens: Sequence[int], proj: Proj) -> torch.Tensor:
        """h [T, H] -> [T, H]: the samples of ``seq_lens`` laid end to end, each attending causally to itself
        only."""
        blk = self.layers[i]
        T, H = h.shape
        nh, hd = self.cfg.heads, H // self.cfg.heads
        x = blk.input_norm(h)
        pre = f"layers.{i}.self_attn."
        q = proj(pre + "q_proj", blk.self_attn.q_proj, x).view(T, nh, hd).transpose(0, 1)
        k = proj(pre + "k_proj", blk.self_attn.k_proj, x).view(T, nh, hd).transpose(0, 1)
        v = proj(pre + "v_proj", blk.self_attn.v_proj, x).view(T, nh, hd).transpose(0, 1)
        # one causal attention per sample (varlen), not one over the microbatch with a block-diagonal mask: a masked
        # probability is 0, but 0 x inf is NaN, so one job's diverged (inf/nan) rows turned every row of every job
        # packed beside it into NaN, forward and backward, and a healthy job's adapter was written NaN
        lens = [int(n) for n in seq_lens]
        att = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True) for qs, ks, vs in
                         zip(q.split(lens, 1), k.split(lens, 1), v.split(lens, 1))], dim=1) if T else q
        h = h + proj(pre + "o_proj", blk.self_attn.o_proj, att.transpose(0, 1).reshape(T, H))
        x = blk.post_norm(h)
        pre = f"layers.{i}.mlp."
        g = proj(pre + "gate_proj", blk.mlp.gate_proj, x)
        u = proj(pre + "up_proj", blk.mlp.up_proj, x)
        return h + proj(pre + "down_proj", blk.mlp.down_proj, F.silu(g) * u)

    @staticmethod
    def packed_positions(seq_lens: Sequence[int], device=None) -> torch.Tensor:
        return torch.cat([torch.arange(n, device=device) for n in seq_lens]) if seq_lens else torch.zeros(0, dtype=torch.long)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.cfg.max_positions:
            raise ValueError(f"sample longer than max_positions {self.cfg.max_positions}")
        return self.embed_tokens(tokens) + self.embed_positions(positions)

    # ---- packed path (trainer) -----------------------------------------------------------------------
    def forward_packed(self, seq_lens: Sequence[int], proj: Proj, *, tokens: torch.Tensor | None = None,
                       hidden: torch.Tensor | None = None, layers: tuple[int, int] | None = None,
                       head: bool = True) -> torch.Tensor:
        """Run layers [start, end) over one packed microbatch. Give ``tokens`` [T] to start from the embedding
        (first stage) or ``hidden`` [T, H] (later stages); ``head`` adds the final norm + LM head (last stage).
        Returns logits [T, V] with ``head``, else hidden [T, H]."""
        start, end = layers or (0, self.cfg.layers)
        if tokens is not None:
            h = self.embed(tokens, self.packed_positions(seq_lens))
        else:
            h = hidden
        for i in range(start, end):
            h = self._block(i, h, seq_lens, proj)
        if head:
            h = proj("lm_head", self.lm_head, self.norm(h))
        return h

    # ---- standard path (PEFT wraps this) -------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        """input_ids [B, L] (every row one sample of length L) -> logits [B, L, V]."""
        B, L = input_ids.shape
        out = []
        for b in range(B):
            out.append(self.forward_packed([L], plain_proj, tokens=input_ids[b]))
        return torch.stack(out)


class LoRAAdapter(nn.Module):
    """One job's LoRA matrices: for each targeted module path, A [r, in] and B [out, r] (trainable)."""

    def __init__(self, model: TinyCausalLM, spec: AdapterSpec, *, seed: int = 0, init_b: str = "zeros"):
        super().__init__()
        self.spec = spec
        self.paths: list[str] = []
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed64(seed))
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in spec.modules:
                key = name.replace(".", "__")
                a = torch.empty(spec.r, mod.in_features)
                bound = 1.0 / math.sqrt(mod.in_features)
                a.uniform_(-bound, bound, generator=gen)
                if init_b == "zeros":
                    b = torch.zeros(mod.out_features, spec.r)
                elif init_b == "random":
                    b = torch.randn(mod.out_features, spec.r, generator=gen) / math.sqrt(spec.r)
                else:
                    raise ValueError(f"init_b: {init_b!r} must be 'zeros' or 'random'")
                self.lora_A[key] = nn.Parameter(a)
                self.lora_B[key] = nn.Parameter(b)
                self.paths.append(name)
        if not self.paths:
            raise ValueError(f"target_modules {spec.modules} match no module of the model")

    @property
    def scale(self) -> float:
        return self.spec.scale

    def has(self, path: str) -> bool:
        return path.replace(".", "__") in self.lora_A

    def pair(self, path: str) -> tuple[nn.Parameter, nn.Parameter]:
        key = path.replace(".", "__")
        return self.lora_A[key], self.lora_B[key]

    # ---- PEFT format ------------------------------------------------------------------------------------
    def peft_state_dict(self, paths: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """PEFT's saved keys: base_model.model.<path>.lora_A.weight [r, in] / lora_B.weight [out, r]."""
        out = {}
        for p in (paths if paths is not None else self.paths):
            a, b = self.pair(p)
            out[f"base_model.model.{p}.lora_A.weight"] = a.detach().clone().contiguous()
            out[f"base_model.model.{p}.lora_B.weight"] = b.detach().clone().contiguous()
        return out

    def peft_config(self) -> dict:
        s = self.spec
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": s.r,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "target_modules": sorted(s.modules),
            "bias": "none",
            "use_rslora": s.use_rslora,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    def load_peft_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for p in self.paths:
                a, b = self.pair(p)
                a.copy_(sd[f"base_model.model.{p}.lora_A.weight"])
                b.copy_(sd[f"base_model.model.{p}.lora_B.weight"])


#: the files of one adapter in PEFT's layout: weights, config
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def save_peft_adapter(out_dir: str | os.PathLike, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ADAPTER_FILES (PEFT's layout: adapter_model.safetensors + adapter_config.json) into ``out_dir``
    atomically (each file goes through a temp file + rename)."""
    from safetensors.torch import save

    out = Path(out_dir)
    weights, config_file = ADAPTER_FILES
    with atomic_path(out / weights) as tmp:
        # the bytes into atomic_path's file, which has the usual permissions (save_file renames a 0600 temp file of
        # its own over it: the weights were unreadable to other accounts beside 0644 config files)
        tmp.write_bytes(save(state, metadata={"format": "pt"}))
    atomic_write_text(out / config_file, json.dumps(config, indent=1) + "\n")
    return out
