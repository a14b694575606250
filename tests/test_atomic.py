"""Atomic writes leave either the old file or the complete new one."""
import json

import pytest

from threempose.atomic import atomic_open, atomic_write_json


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
