"""The profiler CLI: params and GFLOPs per exit, Table A.1, Fig. A.1, supernet configs, teacher."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from threempose.config import ModelConfig
from threempose.util.flops import count_params, measure_gflops
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.profile import main
from threempose.util.cli import parse_size

ROOT = Path(__file__).resolve().parents[1]
THESIS = ROOT / "configs" / "genotypes" / "3m-pose-thesis.json"
TINY = dict(rows=3, layers=4, channels=4, eels=[2, 3], stem_blocks=1)


@pytest.fixture(scope="module")
def tiny_genotype(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    g = Supernet(ModelConfig(**TINY)).derive()
    path = tmp_path_factory.mktemp("g") / "tiny.json"
    g.save(path)
    return path


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_input_size_is_n_or_width_x_height():
    assert parse_size("512") == (512, 512)
    assert parse_size("640x480") == (480, 640)
    for bad in ("", "0", "640x", "a", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_genotype_json_reports_params_and_static_gflops_per_exit(capsys, tiny_genotype):
    code, out, _ = run_main(capsys, "--genotype", tiny_genotype, "--input-size", "60x44", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["input_size"] == [44, 60]
    from threempose.nas.genotype import Genotype

    net = DerivedNet(Genotype.load(tiny_genotype), stem_blocks=4).eval()
    assert report["params_m"] == pytest.approx(count_params(net) / 1e6)
    assert [e["layer"] for e in report["exits"]] == [2, 3, 4]
    assert report["gflops"] == pytest.approx(measure_gflops(lambda: net(torch.zeros(1, 3, 44, 60))))
    gflops = [e["gflops"] for e in report["exits"]]
    assert gflops == sorted(gflops) and gflops[-1] == report["gflops"]


def test_genotype_text_table_and_drawing(capsys, tiny_genotype, tmp_path):
    png = tmp_path / "fabric.png"
    code, out, _ = run_main(capsys, "--genotype", tiny_genotype, "--input-size", "64", "--table", "--draw", png)
    assert code == 0
    assert "GFLOPs" in out and "M params" in out
    assert "| Cell | Layer | Row | Inputs | O^0 | O^1 | O^2 |" in out
    assert out.count("\n| ") == 1 + 11                      # header + 11 cells
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > img.height > 100


def test_config_profiles_argmax_architecture_and_whole_supernet(capsys, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": TINY}))
    code, out, _ = run_main(capsys, "--config", cfg, "--input-size", "64", "--json")
    assert code == 0
    report = json.loads(out)
    torch.manual_seed(0)
    supernet = Supernet(ModelConfig(**TINY))
    assert report["supernet"]["params_m"] == pytest.approx(
        sum(p.numel() for p in supernet.weight_parameters()) / 1e6)
    supernet.sampling = "dense"
    dense = measure_gflops(lambda: supernet(torch.zeros(1, 3, 64, 64), tau=1.0))
    assert report["supernet"]["gflops"] == pytest.approx(dense, rel=1e-6)
    assert report["argmax"]["gflops"] < report["supernet"]["gflops"]
    assert report["argmax"]["params_m"] < report["supernet"]["params_m"]


def test_errors_are_reported_without_a_traceback(capsys, tmp_path):
    code, _, err = run_main(capsys, "--genotype", tmp_path / "missing.json")
    assert code == 2 and "missing.json" in err
    with pytest.raises(SystemExit):
        main(["--model", "higherhrnet-w32", "--table"])


def test_module_entry_point_and_teacher():
    done = subprocess.run([sys.executable, "-m", "threempose.profile", "--model", "higherhrnet-w32",
                           "--input-size", "64", "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "higherhrnet-w32"
    assert report["params_m"] == pytest.approx(28.645331, abs=1e-6)
