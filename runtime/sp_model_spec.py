"""The tiny GPT of :mod:`adasched.runtime.sp_model`, described without torch: its name, default sizes and exact
parameter count. ``sp_model.TinyGPTConfig`` takes its defaults from here and ``launch/train_sp``'s host-memory
check counts parameters with :func:`param_count`, so the check (run on ``--check-plan-only``, which must not load
torch) and the model agree by construction (tests/runtime/test_train_sp_model.py compares them with a built model)."""
from __future__ import annotations

__all__ = ["MODEL_NAME", "VOCAB", "HIDDEN", "HEADS", "LAYERS", "MAX_LEN", "MLP_RATIO", "param_count"]

#: the name an SP plan gives this model (a plan made for the runtime's own tiny GPT, not for a planner preset)
MODEL_NAME = "tiny-gpt"
#: token ids in [0, VOCAB)
VOCAB = 256
#: model width (= heads x head_dim)
HIDDEN = 32
#: attention heads (an SP degree that does not divide them splits them unevenly)
HEADS = 4
#: transformer blocks
LAYERS = 2
#: learned positions: longest sequence (tokens)
MAX_LEN = 256
#: MLP width / hidden
MLP_RATIO = 4


def param_count(hidden: int, layers: int, max_len: int, vocab: int = VOCAB, mlp_ratio: int = MLP_RATIO) -> int:
    """Exact parameters of ``TinyGPT(TinyGPTConfig(hidden, layers, max_len, vocab, mlp_ratio))``.

    Per block: two LayerNorms (2 h each), QKV (3 h^2 + 3 h), output projection (h^2 + h), MLP
    (r h^2 + r h, then r h^2 + h); plus token and position embeddings (V h, max_len h), the final LayerNorm (2 h)
    and the output head without bias (V h)."""
    h, r = hidden, mlp_ratio
    block = (4 + 2 * r) * h * h + (9 + r) * h
    return layers * block + (2 * vocab + max_len + 2) * h
