"""`python -m adasched.launch.demo [STEP ...]`: unknown steps are an error, not a silent no-op."""
from adasched.launch.demo import STEPS, main


def test_unknown_step_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lorra"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step 'lorra': unknown (steps: ") and err.count("\n") == 1
    assert all(name in err for name, _ in STEPS)
    assert not (tmp_path / "demo-out").exists()


def test_help_lists_the_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    assert "steps: " + " ".join(name for name, _ in STEPS) in capsys.readouterr().out
    assert not (tmp_path / "demo-out").exists()
