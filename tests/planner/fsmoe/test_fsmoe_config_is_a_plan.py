"""`plan moe --config` given an adasched file of another kind (a plan): one line saying so."""
from __future__ import annotations

import random

from adasched.planner.cli import main


def test_a_plan_given_as_the_config_is_named_as_such(tmp_path, capsys):
    """`plan moe --config plan.json` (an MoE plan, easy to pass by mistake) said "[0].name: Field required (and 18
    more)": the pydantic error of reading a plan as a config."""
    plan = tmp_path / "plan.json"
    gpus = random.Random().choice([8, 16, 64])
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", str(gpus), "--out", str(plan)]) == 0
    capsys.readouterr()
    out = tmp_path / "again.json"
    assert main(["plan", "moe", "--config", str(plan), "--gpus", str(gpus), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {plan}: is an adasched 'moe' file, not an MoE config file (a config "
                                       f"holds hidden, ffn_hidden, experts, top_k, ...; an MoE plan is read by "
                                       f"train_moe --plan)\n")
    assert not out.exists()
