"""A job packed beside a diverged one trains as it would alone (26th session's LoRA trainer hunt): attention ran
once over the packed microbatch with a block-diagonal mask, and a masked probability of 0 times another sample's
inf is NaN - every row of every job in the microbatch went NaN, forward and backward."""
from __future__ import annotations

import random

import torch

from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig, plain_proj


def _run(model, tokens, seq_lens, delta, poison_rows):
    """Layer 0's v_proj gets ``delta`` added on the last sample's rows (a leaf standing for its adapter) and
    inf on ``poison_rows`` (another job's diverged adapter). Returns (logits of the last sample, its grad)."""
    n_last = seq_lens[-1]

    def proj(path, mod, x):
        y = plain_proj(path, mod, x)
        if path == "layers.0.self_attn.v_proj":
            add = torch.zeros_like(y)
            add[y.shape[0] - n_last:] = delta
            y = y + add
            if poison_rows:
                y = y.index_put((torch.tensor(poison_rows),), torch.tensor(float("inf")))
        return y

    logits = model.forward_packed(seq_lens, proj, tokens=tokens)[-n_last:]
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return logits.detach(), delta.grad.clone()


def test_a_diverged_sample_does_not_reach_the_samples_packed_beside_it():
    rng = random.Random()
    cfg = TinyLMConfig(vocab_size=32, hidden=16, layers=2, heads=2, ffn_hidden=24, max_positions=64,
                       seed=rng.randint(0, 10**6))
    model = TinyCausalLM(cfg)
    lens = [rng.randint(2, 12) for _ in range(rng.randint(1, 3))] + [rng.randint(2, 12)]
    tokens = torch.randint(0, cfg.vocab_size, (sum(lens),))
    d0 = torch.randn(lens[-1], cfg.hidden) * 0.1
    alone, g_alone = _run(model, tokens[-lens[-1]:], lens[-1:], d0.clone().requires_grad_(), [])
    poison = sorted(rng.sample(range(sum(lens[:-1])), k=rng.randint(1, sum(lens[:-1]))))
    packed, g_packed = _run(model, tokens, lens, d0.clone().requires_grad_(), poison)
    assert torch.isfinite(packed).all() and torch.isfinite(g_packed).all()
    # float32: the packed run's GEMMs have other shapes than the lone sample's, so another summation order (a fresh
    # draw in CI differed by up to 4.2e-6: atol 1e-6 failed it); a leaked NaN/inf or another sample's
    # rows would differ by orders more
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-5, atol=1e-5)
