"""31st session's checkpoint/GEMM hunt: GemmConfig checked ranges but not types - block_m 64.0 failed on `&` with a
TypeError, group_m 2.5 inside the Triton interpreter, num_stages 2.5 and maxnreg 168.5 were taken; from_knobs read
warp_specialize "false" as True (bool("false")) and a missing key as a bare KeyError. One ValueError naming the
field now; numpy integers and bools still pass (sweeps build configs from them)."""
from __future__ import annotations

import numpy as np
import pytest

from adasched.kernels.gemm import GemmConfig


@pytest.mark.parametrize("field,value", [("block_m", 64.0), ("group_m", 2.5), ("num_stages", 2.5), ("maxnreg", 168.5),
                                         ("num_warps", "4"), ("block_k", True), ("warp_specialize", "false"),
                                         ("tma", 1), ("persistent", None)])
def test_a_field_of_the_wrong_type_is_named(field, value):
    with pytest.raises(ValueError, match=rf"^GemmConfig\.{field} = {value!r} must be "):
        GemmConfig(**{field: value})


def test_numpy_values_and_knobs():
    cfg = GemmConfig(block_m=np.int64(64), num_stages=np.int32(2), warp_specialize=np.bool_(False))
    assert cfg.block_m == 64 and cfg.num_stages == 2
    kw = dict(block_m=64, block_n=64, block_k=32)
    assert GemmConfig.from_knobs({"num_stages": 3, "num_warps": 8, "warp_specialize": True}, **kw).tma is True
    with pytest.raises(ValueError, match=r"^GemmConfig\.warp_specialize = 'false' must be True or False"):
        GemmConfig.from_knobs({"num_stages": 3, "num_warps": 8, "warp_specialize": "false"}, **kw)
    with pytest.raises(ValueError, match=r"^knobs: lacks 'num_warps'"):
        GemmConfig.from_knobs({"num_stages": 2}, **kw)
    with pytest.raises(ValueError, match=r"^GemmConfig\.maxnreg = '168' must be an int"):
        GemmConfig.from_knobs({"num_stages": 2, "num_warps": 4, "maxnreg": "168"}, **kw)
