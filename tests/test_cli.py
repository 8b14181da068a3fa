"""`dnd <stage>`: a user error prints one paragraph (what to do), not a traceback; `--debug` shows it."""

import json

import pytest

from dnd_scale.cli import main
from dnd_scale.layout import LayoutError


def _error_paragraph(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["collect", "--run", "{tmp}/run", "--config", "{tmp}/missing.yaml"], "dnd collect: error: config recipe"),
    (["collect", "--run", "{tmp}/run", "--config", "{tmp}/r.yaml", "--tasks", "{tmp}/missing.json"],
     "dnd collect: error: task file"),
    (["collect", "--run", "{tmp}/run", "--config", "{tmp}/r.yaml", "--tasks", "synthetic:sum_mc", "--collect.steps=abc"],
     "dnd collect: error: collect.steps: expected int"),
    (["collect", "--run", "{tmp}/run", "--tasks", "synthetic:sum_mc"], "dnd collect: error: dnd collect needs a recipe"),
    (["plan", "--model", "{tmp}/foo.json"], "dnd plan: error: unsupported model family 'foo'"),
    (["pack", "--run", "{tmp}/nothing-here"], "dnd pack: error: "),
    (["shard", "--run", "{tmp}/nothing-here"], "dnd shard: error: dnd shard needs a recipe"),
    (["eval", "--config", "{tmp}/r.yaml", "--base", "{tmp}/no-base", "--tasks", "synthetic:sum_mc", "--out", "{tmp}/report"],
     "dnd eval: error: base model"),
], ids=["missing-recipe", "missing-task-file", "bad-override", "no-recipe", "unsupported-family", "no-run", "no-shard-run",
        "no-base"])
def test_user_errors_print_one_paragraph_and_exit_1(tmp_path, capsys, argv, expected):
    (tmp_path / "foo.json").write_text(json.dumps({"model_type": "foo", "hidden_size": 8}))
    (tmp_path / "r.yaml").write_text("collect: {base_model: none.json}\n")  # relative to the recipe: {tmp}/none.json
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = _error_paragraph(capsys)
    assert err.startswith(expected), err
    assert "--debug" in err and len(err.strip().splitlines()) == 2  # the message and the hint


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "foo.json").write_text(json.dumps({"model_type": "foo", "hidden_size": 8}))
    with pytest.raises(LayoutError, match="unsupported model family"):
        main(["plan", "--model", str(tmp_path / "foo.json"), "--debug"])


def test_a_bug_outside_dnd_scale_keeps_its_traceback(monkeypatch):
    import dnd_scale.plan

    def broken(argv):
        return int("not a number")  # a ValueError raised by Python itself, not a message for the user

    monkeypatch.setattr(dnd_scale.plan, "main", broken)
    with pytest.raises(ValueError, match="invalid literal"):
        main(["plan"])
