"""TorchScript export: every exit's heatmaps and tags equal the eager network's; the traced input
size is enforced; the CLI."""
import dataclasses

import pytest
import torch

from threempose.export import export_torchscript, load_exported, main
from threempose.model_file import save_model_file

from test_predictor import tiny_infer, tiny_net


@pytest.fixture(scope="module")
def net():
    return tiny_net(seed=1)


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.ts"
    export_torchscript(net, path, (64, 96), infer={"short_side": 64})
    return load_exported(path)


def test_exported_exits_equal_the_eager_network(net, exported):
    module, meta = exported
    assert meta["exit_layers"] == [1, 2, 3] and meta["input_hw"] == [64, 96] and meta["infer"] == {"short_side": 64}
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(2))     # another batch size
    with torch.no_grad():
        heatmaps, tags = module(x)
        eager = net(x)
    assert heatmaps.shape == tags.shape == (3, 3, 17, 16, 24)
    for i, out in enumerate(eager):
        assert torch.allclose(heatmaps[i], out.heatmaps, rtol=1e-5, atol=1e-6)
        assert torch.allclose(tags[i], out.tags, rtol=1e-5, atol=1e-6)
        assert out.heatmaps.abs().max() > 0.1                        # loud heads: not a trivial zero map


@pytest.mark.parametrize("shape", [(1, 3, 96, 64), (1, 3, 64, 128), (1, 3, 60, 96), (1, 1, 64, 96)])
def test_other_input_sizes_are_refused(exported, shape):
    """The trace bakes the fabric's feature sizes in, so other sizes must fail loudly, never give
    silently wrong maps."""
    module, _ = exported
    with pytest.raises(torch.jit.Error, match=r"traced for input \[B, 3, 64, 96\]"):
        module(torch.zeros(shape))


def test_cli_exports_a_model_file(net, tmp_path, capsys):
    model = tmp_path / "model.pt"
    save_model_file(model, net, dataclasses.asdict(tiny_infer()))
    out = tmp_path / "model.ts"
    assert main(["--checkpoint", str(model), "--out", str(out), "--input-size", "96x64"]) == 0
    module, meta = load_exported(out)
    assert meta["input_hw"] == [64, 96] and meta["infer"]["short_side"] == 64
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(module(x)[0][-1], net(x)[-1].heatmaps, rtol=1e-5, atol=1e-6)
    junk = tmp_path / "junk.pt"
    junk.write_text("no")
    assert main(["--checkpoint", str(junk), "--out", str(tmp_path / "x.ts")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "x.ts").exists()
