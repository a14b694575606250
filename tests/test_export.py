"""Exit-segment export: one export (torch.export programs and ONNX models, dynamic batch, H and W)
runs at two input sizes and agrees with the eager network, in PyTorch and in onnxruntime; the
onnxruntime runtime of threempose.infer writes the torch runtime's COCO results; bad input."""
import dataclasses
import itertools
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from threempose.config import EELConfig, ModelConfig
from threempose.data.synthetic import generate
from threempose.inference.segments import META_FILE, ONNX_OPSET, ExportError, export_segments
from threempose.export import main
from threempose.infer import main as infer_main
from threempose.nas.model_file import save_model_file
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.nas.ops import OP_NAMES
from threempose.inference.predictor import Predictor

from test_predictor import TINY_MODEL, loud_heads, tiny_infer

pytest.importorskip("onnx", reason="ONNX export needs the optional extra: pip install 'threempose[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra: pip install 'threempose[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnxruntime runtime needs: pip install 'threempose[onnx]'")

from threempose.inference.segments import load_segments
from threempose.util.files import default_mode

SIZES = [(2, 96, 128), (1, 160, 96)]         # (batch, H, W): two sizes, neither the traced example's


@pytest.fixture(scope="module")
def net():
    """A 2-row, 2-layer fabric with one EEL (two segments: the first returns a carry, the last
    takes one) and every candidate op on its edges (pools, zoomed conv, SE, ...: each must export
    with free H and W); its heads made loud as tiny_net's are. Small, as export takes a while."""
    torch.manual_seed(0)
    genotype = Supernet(ModelConfig(**{**TINY_MODEL, "layers": 2, "eels": [1]})).derive()
    ops = itertools.cycle(OP_NAMES)
    cells = [dataclasses.replace(c, edges=[[next(ops)] for _ in c.edges]) for c in genotype.cells]
    torch.manual_seed(1)
    net = DerivedNet(dataclasses.replace(genotype, cells=cells), 17, TINY_MODEL["stem_blocks"]).eval()
    used = {o for c in net.genotype.cells if not c.pruned for edge in c.edges for o in edge}
    assert used == set(OP_NAMES) and net.genotype.exit_layers == [1, 2]
    return loud_heads(net)


@pytest.fixture(scope="module")
def model(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, net, dataclasses.asdict(tiny_infer(short_side=96)))
    return path


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One export through the CLI (both formats), shared by the tests below."""
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["--checkpoint", str(model), "--out", str(out)]) == 0
    return out


def test_each_segment_file_holds_only_its_own_weights(net, exported):
    """The segments' saved parameters and buffers partition the network's: each is stored in
    exactly one segment file (the stem only in the first, the last exit's head only in the last)."""
    names = [set(k.removeprefix("net.") for k in torch.export.load(str(exported / f"exit{layer}.pt2")).state_dict)
             for layer in (1, 2)]
    whole = set(net.state_dict())
    assert names[0] | names[1] == whole and not names[0] & names[1]
    assert any(n.startswith("stem.") for n in names[0]) and not any(n.startswith("stem.") for n in names[1])
    assert any(n.startswith("heads.2.") for n in names[1]) and not any(n.startswith("heads.2.") for n in names[0])


def test_export_directory_honours_the_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["--checkpoint", str(model), "--out", str(tmp_path / "e"), "--format", "pt2"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o750


def test_metadata_names_every_segment_and_file(exported):
    meta = json.loads((exported / META_FILE).read_text())
    assert meta["exit_layers"] == [1, 2] and meta["onnx_opset"] == ONNX_OPSET and meta["size_multiple"] == 32
    assert meta["infer"]["short_side"] == 96 and (meta["min_size"], meta["max_size"]) == (96, 8192)
    segments = meta["segments"]
    assert [(s["start"], s["layer"]) for s in segments] == [(0, 1), (1, 2)]
    assert segments[0]["inputs"] == ["images"] and segments[0]["outputs"][:2] == ["heatmaps", "tags"]
    assert segments[1]["inputs"] == [n[len("out_"):] for n in segments[0]["outputs"][2:]]    # carry chains
    assert segments[0]["outputs"][-1] == "out_skip" and segments[1]["outputs"] == ["heatmaps", "tags"]
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [META_FILE] + [f"exit{k}.{ext}" for k in (1, 2) for ext in ("pt2", "onnx")])
    assert stat.S_IMODE(exported.stat().st_mode) == default_mode(directory=True)   # the umask, not 0o700
    import onnx
    model = onnx.load(str(exported / "exit2.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))      # batch, h, w symbolic


# Measured (torch 2.13, onnxruntime, CPU): torch.export programs give the eager outputs bit for bit;
# onnxruntime differs by at most 1.3e-6 on heatmaps (values up to ~0.5) and 3e-8 relative on tags.
@pytest.mark.parametrize("runtime, atol", [("torch.export", 1e-6), ("onnxruntime", 1e-4)])
def test_exported_segments_equal_the_eager_network_at_two_sizes(net, exported, runtime, atol):
    segments = load_segments(exported, runtime)
    for batch, h, w in SIZES:
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            eager = net(x)
        got = list(segments.iter_exits(x))
        assert [o.layer for o in got] == [1, 2]
        for e, o in zip(eager, got):
            assert o.heatmaps.shape == (batch, 17, h // 4, w // 4)
            assert (o.heatmaps - e.heatmaps).abs().max() <= atol
            assert (o.tags - e.tags).abs().max() <= atol * max(1.0, float(e.tags.abs().max()))
            assert e.heatmaps.abs().max() > 0.1                       # loud heads: not a trivial zero map
    assert segments.exit_gflops((64, 96)) == net.exit_gflops((64, 96))
    for bad in ((1, 3, 100, 96), (1, 3, 64, 96), (1, 1, 96, 96)):
        with pytest.raises(ValueError, match="multiples of 32 from 96 to 8192"):
            segments.segment(torch.zeros(bad))


def test_onnxruntime_infer_writes_the_torch_runtimes_results(net, model, exported, tmp_path):
    """Same people (keypoints within 5e-5 px) and the same dynamic exits from both runtimes.

    A random network's maps have near-flat plateaus (in the constant padding of a network input
    and along the borders) a little above the default detection threshold, where NMS peaks move
    with any rounding difference; a trained network's maps are ~0 there. So the synthetic images
    are cut to 96 x 128 and 96 x 160 (no padding) and the detection threshold is 0.2."""
    generate(tmp_path / "synthetic", 3, seed=6, min_size=160, max_size=200, max_people=2)
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(sorted((tmp_path / "synthetic" / "images").iterdir())):
        with Image.open(path) as im:
            im.convert("RGB").crop((0, 0, 128 + 32 * (i % 2), 96)).save(images / f"{i + 1:06d}.png")
    settings = tiny_infer(short_side=96, detection_threshold=0.2, exit="dynamic", eels=[EELConfig(layer=1, c0=0.05)])
    scores = [Predictor(net, settings).predict(path).scores[1] for path in sorted(images.iterdir())]
    conf = sorted(s.confidence for s in scores if s.detected)
    settings.eels[0].threshold = (conf[-1] + conf[-2]) / 2            # the most confident image leaves at 1
    config = tmp_path / "infer.json"
    config.write_text(json.dumps({"infer": dataclasses.asdict(settings)}))
    outs = {}
    for runtime, source in (("torch", ["--checkpoint", str(model)]), ("onnxruntime", ["--onnx", str(exported)])):
        out = tmp_path / f"{runtime}.json"
        assert infer_main(["--runtime", runtime, *source, "--images", str(images), "--out", str(out), "--batch", "2",
                           "--config", str(config), "--no-progress"]) == 0
        outs[runtime] = (json.loads(out.read_text()), json.loads(out.with_suffix(".images.json").read_text()))
    (torch_results, torch_meta), (ort_results, ort_meta) = outs["torch"], outs["onnxruntime"]
    exits = [r["exit"] for r in torch_meta["images"]]
    assert [r["exit"] for r in ort_meta["images"]] == exits and len(set(exits)) == 2
    assert len(torch_results) == len(ort_results) > 0
    unmatched = list(ort_results)                 # people of equal score may come in either order
    for a in torch_results:
        match = next(b for b in unmatched if b["image_id"] == a["image_id"]
                     and np.abs(np.array(a["keypoints"]) - np.array(b["keypoints"])).max() <= 5e-5)
        assert match["score"] == pytest.approx(a["score"], abs=5e-6)    # measured 6.5e-8; keypoints 4.8e-7 px
        unmatched.remove(match)


def test_bad_output_directory_and_checkpoint_are_clear_errors(net, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier threempose export"):
        export_segments(net, taken)
    with pytest.raises(ExportError, match="unknown export format"):
        export_segments(net, tmp_path / "x", formats=["ts"])
    assert (taken / "notes.txt").read_text() == "mine"
    junk = tmp_path / "junk.pt"
    junk.write_text("no")
    assert main(["--checkpoint", str(junk), "--out", str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no temporary directory left


def test_infer_runtime_flags_are_checked(model, exported, tmp_path):
    for argv in (["--runtime", "onnxruntime", "--checkpoint", str(model)],
                 ["--onnx", str(exported)],
                 ["--runtime", "onnxruntime", "--onnx", str(exported), "--checkpoint", str(model)]):
        with pytest.raises(SystemExit) as e:
            infer_main([*argv, "--images", str(tmp_path), "--out", str(tmp_path / "r.json")])
        assert e.value.code == 2
