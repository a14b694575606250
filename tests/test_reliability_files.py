"""Files of the wrong kind: one line saying what the file is not (genotypes, latency tables,
checkpoints, model files whose weights do not fit their genotype, code-carrying pickles)."""
import re

import pytest
import torch
from torch import nn

from threempose.config import ModelConfig
from threempose.engine.checkpoint import CheckpointError, StateDictMismatchError, check_state_dict, load_checkpoint
from threempose.nas.model_file import load_model_file, save_model_file
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.nas.genotype import Genotype, GenotypeError
from threempose.nas.latency_table import LatencyTable, LatencyTableError
from threempose.profile import main as profile_main

TINY = dict(rows=2, layers=2, channels=4, eels=[], stem_blocks=0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = DerivedNet(Supernet(ModelConfig(**TINY)).derive(), 17, 0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, net, {})
    return path


def test_a_model_file_given_as_a_genotype_or_latency_table_is_named_not_json(model_file, capsys):
    with pytest.raises(GenotypeError, match=rf"^{re.escape(str(model_file))}: not a JSON file \(a zip archive, "
                                            r"e\.g\. a PyTorch checkpoint such as model\.pt\); expected a JSON genotype"):
        Genotype.load(model_file)
    with pytest.raises(LatencyTableError, match="not a JSON file"):
        LatencyTable.load(model_file)
    assert profile_main(["--genotype", str(model_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {model_file}: not a JSON file")


@pytest.mark.parametrize("content, kind", [(b"\x89PNG\r\n\x1a\n\x00\x00", r"binary: byte 0 is not UTF-8"),
                                           (b'{"rows": 1\x00}', "binary: it holds NUL bytes")])
def test_binary_files_are_not_json(tmp_path, content, kind):
    (tmp_path / "g.json").write_bytes(content)
    with pytest.raises(GenotypeError, match=rf"not a JSON file \({kind}"):
        Genotype.load(tmp_path / "g.json")


def test_a_state_dict_mismatch_is_one_line_with_counts_and_the_first_keys():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))          # keys 0.weight, 0.bias, 1.weight, 1.bias
    sd = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(5), "extra.a": torch.zeros(1),
          "extra.b": torch.zeros(1), "extra.c": torch.zeros(1), "extra.d": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError) as caught:
        check_state_dict(model, sd, "ckpt.pt")
    assert str(caught.value) == (
        "ckpt.pt does not fit Sequential: 2 missing keys (1.weight, 1.bias); "
        "4 unexpected keys (extra.a, extra.b, extra.c, ... (+1)); "
        "1 shape mismatches, checkpoint vs model (0.bias: [5] vs [3])")
    assert caught.value.unexpected == ["extra.a", "extra.b", "extra.c", "extra.d"]


def test_a_model_file_whose_weights_do_not_fit_its_genotype_is_one_line(model_file, tmp_path):
    state = torch.load(model_file, weights_only=True)
    state["genotype"]["channels"] = 8                                # every conv changes shape
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"weights vs its genotype\) does not fit DerivedNet: "
                                              r"\d+ shape mismatches") as caught:
        load_model_file(tmp_path / "model.pt")
    assert "\n" not in str(caught.value) and str(caught.value).count(": [") == 3     # the first three


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_code_carrying_pickle_is_not_a_threempose_checkpoint_and_does_not_run(tmp_path, capsys):
    torch.save({"format": "threempose-checkpoint", "version": 1, "x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'evil.pt'} is not a threempose checkpoint")
    assert "weights_only" not in message and "\n" not in message
    assert "this ran" not in capsys.readouterr().out
