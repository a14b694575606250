"""Every command answers a user's mistake with one ``error:`` line and exit 2, before any work."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from threempose import evaluate, export, infer, profile, search, train
from threempose.util.errors import OutputPathError
from threempose.util.cli import check_output_dir, check_output_file, entry_point
from threempose.config import load_config
from threempose.engine.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "search-small.json"
TRAIN_SMALL = ROOT / "configs" / "train-small.json"
GENOTYPE = ROOT / "configs" / "genotypes" / "3m-pose-thesis.json"


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def one_error_line(capsys) -> str:
    """The command's stderr ends with its only ``error: ...`` line, without a traceback (progress
    bars of work done before may precede it); returns that line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:] and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def tiny(tmp_path: Path, base: Path = SMALL, **sections) -> Path:
    """A small config (quick to build) extending ``base``, with ``sections`` merged in."""
    raw = {"extends": str(base),
           "run": {"out_dir": str(tmp_path / "runs"), "progress": False, "val_ap_images": 0},
           "data": {"input_size": 64, "batch_size": 4,
                    "synthetic": {"train_images": 8, "val_images": 2, "min_size": 64, "max_size": 64,
                                  "cache_dir": str(tmp_path / "cache")}},
           "model": {"rows": 2, "layers": 3, "channels": 4, "eels": [2], "stem_blocks": 0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return write(tmp_path / "tiny.json", raw)


# --------------------------------------------------------------------------- #
# bad configs, genotypes, data, checkpoints: one line, exit 2
# --------------------------------------------------------------------------- #
BAD_CONFIGS = {
    "unknown key": ({"run": {"nmae": "x"}}, "unknown key 'run.nmae'"),
    "wrong type": ({"run": {"seed": "zero"}}, "'run.seed' must be int"),
    "malformed JSON": ('{"run": {"seed": 1}', "not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "missing extends target": ({"extends": "nope.json"}, "config file not found"),
}


@pytest.mark.parametrize("command", [search, train])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, command, case):
    content, message = BAD_CONFIGS[case]
    if isinstance(content, dict) and "extends" not in content:
        content = {"extends": str(SMALL if command is search else TRAIN_SMALL), **content}
    config = write(tmp_path / "bad.json", content)
    argv = ["--config", str(config)] + (["--genotype", str(GENOTYPE)] if command is train else [])
    assert command.main(argv) == 2
    line = one_error_line(capsys)
    assert message in line and "bad.json" in line


def test_missing_config_and_extends_cycle(tmp_path, capsys):
    assert search.main(["--config", str(tmp_path / "absent.json")]) == 2
    assert "config file not found" in one_error_line(capsys)
    write(tmp_path / "a.json", {"extends": "b.json"})
    write(tmp_path / "b.json", {"extends": "a.json"})
    assert search.main(["--config", str(tmp_path / "a.json")]) == 2
    assert "'extends' cycle" in one_error_line(capsys)


def test_unknown_key_in_a_base_file_is_reported_against_the_base(tmp_path, capsys):
    base = write(tmp_path / "base.json", {"extends": str(SMALL), "data": {"bogus": 1}})
    child = write(tmp_path / "child.json", {"extends": base.name, "run": {"name": "x"}})
    assert search.main(["--config", str(child)]) == 2
    line = one_error_line(capsys)
    assert "base.json: unknown key 'data.bogus'" in line and "child.json" not in line
    # a key the child overrides with a bad value is the child's
    write(child, {"extends": base.name, "data": {"bogus": 1, "batch_size": "8"}})
    with pytest.raises(Exception, match="child.json: unknown key 'data.bogus'"):
        load_config(child)


def test_train_refuses_a_search_config_and_search_a_train_config(capsys):
    assert train.main(["--config", str(SMALL), "--genotype", str(GENOTYPE)]) == 2
    assert f"python -m threempose.search --config {SMALL}" in one_error_line(capsys)
    assert search.main(["--config", str(TRAIN_SMALL)]) == 2
    assert f"python -m threempose.train --config {TRAIN_SMALL}" in one_error_line(capsys)


def test_bad_genotype(tmp_path, capsys):
    bad = write(tmp_path / "g.json", {"format": 1})
    assert train.main(["--config", str(TRAIN_SMALL), "--genotype", str(bad)]) == 2
    assert "g.json" in one_error_line(capsys)
    assert train.main(["--config", str(TRAIN_SMALL), "--genotype", str(tmp_path / "none.json")]) == 2
    assert "none.json" in one_error_line(capsys)


def test_missing_coco_folder(tmp_path, capsys):
    config = tiny(tmp_path, data={"dataset": "coco", "root": str(tmp_path / "no-coco")})
    assert search.main(["--config", str(config)]) == 2
    assert "no-coco" in one_error_line(capsys)


def test_missing_teacher_checkpoint(tmp_path, capsys):
    config = tiny(tmp_path, loss={"teacher_weight": 1.0, "teacher": {"checkpoint": str(tmp_path / "t.pth")}})
    assert search.main(["--config", str(config)]) == 2
    assert "teacher checkpoint not found" in one_error_line(capsys)


def test_resume_errors_config_mismatch_and_unreadable_checkpoint(tmp_path, capsys):
    config = tiny(tmp_path)
    run = RunDir.create(load_config(config))
    write(config, {**json.loads(config.read_text()), "search": {"epochs": 3}})
    assert search.main(["--config", str(config), "--resume", str(run.path)]) == 2
    assert "key search.epochs differs" in one_error_line(capsys)

    run = RunDir.create(load_config(config))
    run.last_checkpoint.write_bytes(b"PK\x03\x04 cut short")
    assert search.main(["--config", str(config), "--resume", str(run.path)]) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line and "last.pt" in line


def test_unexpected_errors_keep_their_traceback():
    @entry_point
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main([])


def test_as_a_user_runs_it(tmp_path):
    """``python threempose/search.py`` with a bad config: one stderr line, exit 2."""
    config = write(tmp_path / "bad.json", {"extends": str(SMALL), "run": {"nmae": "x"}})
    cmd = [sys.executable, str(ROOT / "threempose" / "search.py"), "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "THREEMPOSE_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: unknown key 'run.nmae' (known keys"), lines


def test_debug_flag_and_variable_let_the_exception_through(tmp_path, monkeypatch):
    from threempose.config import ConfigError

    config = write(tmp_path / "bad.json", {"extends": str(SMALL), "run": {"nmae": "x"}})
    monkeypatch.setenv("THREEMPOSE_DEBUG", "0")          # restored after the test (--debug sets it)
    with pytest.raises(ConfigError, match="run.nmae"):
        search.main(["--config", str(config), "--debug"])
    monkeypatch.setenv("THREEMPOSE_DEBUG", "1")
    with pytest.raises(ConfigError, match="run.nmae"):
        search.main(["--config", str(config)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow     # two processes joining a gloo group
@pytest.mark.skipif(sys.platform != "linux", reason="two gloo ranks on localhost")
def test_two_ranks_both_exit_2_and_only_rank_0_prints(tmp_path):
    """An error after the process group is joined (a missing teacher): both ranks exit 2."""
    pytest.importorskip("deepspeed", reason="init_distributed joins through deepspeed")
    config = tiny(tmp_path, run={"device": "cpu"},
                  loss={"teacher_weight": 1.0, "teacher": {"checkpoint": str(tmp_path / "t.pth")}})
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "threempose.search", "--config", str(config)],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    errors = [[line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
              for _, err in outs]
    assert len(errors[0]) == 1 and errors[0][0].startswith("error: teacher checkpoint not found"), outs[0][1]
    assert errors[1] == [], outs[1][1]


# --------------------------------------------------------------------------- #
# outputs are checked before any work
# --------------------------------------------------------------------------- #
def test_output_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_file(tmp_path / "dir", "--out")
    with pytest.raises(OutputPathError, match="file, not a directory"):
        check_output_file(tmp_path / "file" / "sub" / "out.json", "--out")
    with pytest.raises(OutputPathError, match="file, not a directory"):
        check_output_dir(tmp_path / "file", "--draw")
    assert check_output_file(tmp_path / "new" / "deeper" / "out.json", "--out").name == "out.json"
    assert check_output_dir(tmp_path / "dir", "--draw") == tmp_path / "dir"


def test_infer_checks_out_and_draw_before_reading_anything(tmp_path, capsys):
    """The checkpoint and images do not even exist: the --out / --draw problem is found first."""
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("x")
    base = ["--checkpoint", str(tmp_path / "missing.pt"), "--images", str(tmp_path / "no-images")]
    assert infer.main(base + ["--out", str(tmp_path / "out")]) == 2
    assert "--out" in one_error_line(capsys)
    assert infer.main(base + ["--out", str(tmp_path / "afile" / "r.json")]) == 2
    assert "afile is a file" in one_error_line(capsys)
    assert infer.main(base + ["--out", str(tmp_path / "r.json"), "--draw", str(tmp_path / "afile")]) == 2
    assert "--draw" in one_error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_other_commands_answer_in_one_line(tmp_path, capsys):
    assert evaluate.main(["--annotations", str(tmp_path / "a.json"), "--results", str(tmp_path / "r.json")]) == 2
    one_error_line(capsys)
    assert profile.main(["--genotype", str(tmp_path / "g.json")]) == 2
    one_error_line(capsys)
    assert export.main(["--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m")]) == 2
    one_error_line(capsys)


def test_search_and_export_check_their_outputs_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = tiny(tmp_path, run={"out_dir": str(tmp_path / "afile")})
    assert search.main(["--config", str(config)]) == 2
    assert "run.out_dir" in one_error_line(capsys) and not (tmp_path / "cache").exists()   # no data made
    (tmp_path / "export").write_text("x")                  # export writes a directory
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "export")]) == 2
    assert "--out" in one_error_line(capsys)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "other")]) == 2
    assert "not an earlier threempose export" in one_error_line(capsys)
