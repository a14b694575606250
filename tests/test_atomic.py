"""Atomic writes leave either the old file or the complete new one."""
import json
import os
import stat

import pytest

from threempose.util.files import atomic_open, atomic_torch_save, atomic_write_json, remove_stale_temporaries


def test_atomic_write_json_round_trip(tmp_path):
    p = tmp_path / "sub" / "out.json"
    atomic_write_json(p, {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.json"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_honour_the_umask_as_a_plain_open_does(tmp_path, umask_022):
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    atomic_write_json(tmp_path / "atomic.json", {})
    atomic_torch_save(tmp_path / "atomic.pt", {"x": 1})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"plain.json": 0o644, "atomic.json": 0o644, "atomic.pt": 0o644}
    os.umask(0o077)
    atomic_write_json(tmp_path / "private.json", {})
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_rewriting_keeps_the_existing_files_mode(tmp_path, umask_022):
    p = tmp_path / "shared.json"
    p.write_text("{}")
    p.chmod(0o664)
    atomic_write_json(p, {"a": 1})
    assert stat.S_IMODE(p.stat().st_mode) == 0o664 and json.loads(p.read_text()) == {"a": 1}


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "keep.json").write_text("{}")
    (tmp_path / "visible.tmp").write_text("not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".last.pt.x1y2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "visible.tmp"]
