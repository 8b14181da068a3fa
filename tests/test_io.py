"""io.atomic_folder: a folder is replaced whole or not at all, and no staging folder outlives a run."""

import os

import pytest

from dnd_scale.io import _UMASK, append_jsonl, atomic_folder, building, defer_write, drop_deferred_writes, write_json


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_new_folder_appears_whole_and_follows_the_umask(tmp_path):
    with atomic_folder(tmp_path / "out", "test") as staging:
        assert not (tmp_path / "out").exists(), "nothing is in place before the block ends"
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert contents(tmp_path / "out") == {"a.txt": b"a", "sub/b.txt": b"b"}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_UMASK  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_new_folder_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old-only.txt").write_text("old")
    with atomic_folder(tmp_path / "out", "test") as staging:
        (staging / "new.txt").write_text("new")
        assert contents(tmp_path / "out") == {"old-only.txt": b"old"}, "the old folder stays until the new is in place"
    assert contents(tmp_path / "out") == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the retired old folder is removed"


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_a_failure_midway_leaves_the_old_folder_and_no_staging(tmp_path, error):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("old")
    with pytest.raises(type(error)):
        with atomic_folder(tmp_path / "out", "test") as staging:
            (staging / "half.txt").write_text("half")
            raise error
    assert contents(tmp_path / "out") == {"kept.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("old")
    real = os.replace

    def fail_the_swap(src, dst):
        if os.path.basename(src).startswith(".out-staging-"):
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_the_swap)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_folder(tmp_path / "out", "test") as staging:
            (staging / "new.txt").write_text("new")
    assert contents(tmp_path / "out") == {"kept.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_run_are_removed_unless_a_run_builds_there(tmp_path, caplog):
    for left in (".out-staging-k1ll", ".out-old-k1ll"):  # what a run killed by SIGKILL leaves
        (tmp_path / left).mkdir()
        (tmp_path / left / "x").write_text("x")
    (tmp_path / ".other-staging-k1ll").mkdir()  # another folder's: not this one's to remove
    with atomic_folder(tmp_path / "out", "dnd test"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-staging-k1ll", "out"]
    assert "removed what a killed `dnd test` left: .out-old-k1ll, .out-staging-k1ll" in caplog.text
    (tmp_path / ".out-staging-running").mkdir()
    with building(tmp_path / ".out-staging-running"):  # another run is at work on it: left alone
        with atomic_folder(tmp_path / "out", "dnd test"):
            pass
    assert (tmp_path / ".out-staging-running").is_dir()


@pytest.mark.parametrize("first_write", ["file", "folder", "jsonl line"])
def test_a_deferred_write_runs_once_before_the_first_artifact_write(tmp_path, first_write):
    order = []
    defer_write(lambda: order.append("deferred"))
    if first_write == "file":
        write_json(tmp_path / "a.json", {})
    elif first_write == "folder":
        with atomic_folder(tmp_path / "a", "dnd test"):
            pass
    else:
        append_jsonl(tmp_path / "a.jsonl", {})
    order.append("written")
    write_json(tmp_path / "b.json", {})
    assert order == ["deferred", "written"]


def test_a_dropped_deferred_write_never_runs(tmp_path):
    order = []
    defer_write(lambda: order.append("deferred"))
    drop_deferred_writes()
    write_json(tmp_path / "a.json", {})
    assert order == []
