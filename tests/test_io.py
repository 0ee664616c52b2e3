"""afigan.io: the one atomic writer (files, JSON, torch checkpoints)."""

import json
import os

import pytest
import torch

from afigan.io import atomic_open, atomic_torch_save, atomic_write, atomic_write_json


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_bytes_str_and_callable_land_whole_and_leave_no_temporary_file(tmp_path):
    assert atomic_write(str(tmp_path / "a.bin"), b"\x00\x01abc") == str(tmp_path / "a.bin")
    atomic_write(str(tmp_path / "b.txt"), "héllo\n")
    atomic_write(str(tmp_path / "c.bin"), lambda f: f.write(b"from a callable"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01abc"
    assert (tmp_path / "b.txt").read_text() == "héllo\n"
    assert (tmp_path / "c.bin").read_bytes() == b"from a callable"
    assert _leftovers(tmp_path) == []


def test_json_round_trips_with_the_json_keyword_arguments(tmp_path):
    path = str(tmp_path / "sub" / "r.json")  # the folder is made
    atomic_write_json(path, {"b": [1, 2.5], "a": "x"}, indent=2, sort_keys=True)
    text = open(path).read()
    assert text == '{\n  "a": "x",\n  "b": [\n    1,\n    2.5\n  ]\n}'
    assert json.loads(text) == {"a": "x", "b": [1, 2.5]}
    assert _leftovers(tmp_path / "sub") == []


def test_torch_save_round_trips_exactly(tmp_path):
    path = str(tmp_path / "m.pth")
    state = {"w": torch.arange(6.0).reshape(2, 3), "iteration": 7}
    atomic_torch_save(state, path)
    back = torch.load(path, weights_only=False)
    assert back["iteration"] == 7 and torch.equal(back["w"], state["w"])
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_and_keeps_the_mode_open_would_give(tmp_path):
    path = str(tmp_path / "f.txt")
    atomic_write(path, "old")
    atomic_write(path, "new")
    assert open(path).read() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_failing_writer_leaves_the_old_file_intact_and_no_temporary_file(tmp_path):
    path = str(tmp_path / "f.bin")
    atomic_write(path, b"old contents")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert open(path, "rb").read() == b"old contents"
    assert _leftovers(tmp_path) == []


def test_an_unserialisable_json_object_leaves_the_old_file_intact(tmp_path):
    path = str(tmp_path / "r.json")
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.load(open(path)) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_a_stale_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "model.pth"
    stale = tmp_path / ".model.pth.abc123.tmp"  # what a SIGKILL mid-write leaves
    other = tmp_path / ".other.pth.abc123.tmp"  # another target's: not ours to remove
    stale.write_bytes(b"half")
    other.write_bytes(b"half")
    with atomic_open(str(path), "wb") as f:
        f.write(b"whole")
    assert path.read_bytes() == b"whole"
    assert _leftovers(tmp_path) == [".other.pth.abc123.tmp"]


def test_bad_data_type_is_one_sentence(tmp_path):
    with pytest.raises(TypeError, match=r"data must be bytes, str or a callable, not int\.$"):
        atomic_write(str(tmp_path / "x"), 3)
    assert os.listdir(tmp_path) == []
