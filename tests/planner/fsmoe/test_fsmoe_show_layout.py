"""`adasched show` of an MoE plan names the layout each configuration was costed with (what train_moe --plan checks)
and, with expert copies, their gradient all-reduce."""
import pytest

from adasched.planner.cli import main
from adasched.planner.fsmoe.plan import MoEPlan, layout_text
from adasched.planner.plan import load_plan


@pytest.mark.parametrize("extra, want", [
    ([], "EP 8 over nodes, each expert sharded over a node's GPUs, nodes of 8 GPUs (FSMoE's layout; train_moe "
         "--expert-shards 8 --ep-size 8); 1 copy of each expert"),
    (["--ep-size", "8"], "flat EP 8 (one all-to-all), nodes of 8 GPUs; 8 copies of each expert, expert-gradient "
                         "all-reduce {ar} ms ({ex} ms not hidden in the backward)"),
    (["--ep-size", "8", "--two-step-a2a", "--gpus-per-node", "4"],
     "EP 8, two-step all-to-all (4 ranks per node: intra- then inter-node; train_moe --hierarchical --gpus-per-node "
     "4), nodes of 8 GPUs; 8 copies of each expert, expert-gradient all-reduce {ar} ms ({ex} ms not hidden in the "
     "backward)"),
])
def test_show_names_the_layout(extra, want, tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "64", *extra, "--out", str(out)]) == 0
    plan = load_plan(out, expect=MoEPlan)
    rows = dict(plan.summary_rows())
    for c in plan.configs:
        text = want.format(ar=f"{c.expert_grad_allreduce_ms:,.2f}", ex=f"{c.expert_grad_exposed_ms:,.2f}")
        assert rows[f"{c.name} layout"] == layout_text(c) == text
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert "layout" in capsys.readouterr().out
