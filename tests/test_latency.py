"""Latency tables and latency-aware search: the expected latency equals the table's sum for a
one-hot sample and reaches every architecture parameter, stale / foreign tables are clear
errors, ``python -m threempose.latency`` covers every block the cost model prices, the loss
uses the configured metric. Timed checks (predicted vs measured latency, searches under two
latency targets) are in bench/test_bench_latency.py and bench/test_bench_latency_search.py."""
import json
import random
import warnings

import pytest
import torch

from threempose.config import ConfigError, LossConfig, ModelConfig, config_from_dict
from threempose.inference.deploy import cpu_bf16_missing
from threempose.measure.latency import fabric_blocks
from threempose.latency import main as latency_main
from threempose.training.losses import PoseLoss, flops_loss
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.nas.genotype import FabricLayout
from threempose.nas.latency_table import (LatencyTable, LatencyTableError, add_key, block_key, device_name,
                                          op_key, output_key, path_key)
from threempose.nas.ops import OP_NAMES

TINY = dict(rows=3, layers=4, channels=4, eels=[2, 3], stem_blocks=1)
HW = (32, 32)


def tiny_supernet(**over) -> Supernet:
    torch.manual_seed(0)
    return Supernet(ModelConfig(**{**TINY, **over}))


def random_table(net: Supernet, hw=HW, seed: int = 0, **fields) -> LatencyTable:
    """A table for ``net``'s fabric with a random ms in [0.1, 2) for every block key."""
    rng = random.Random(seed)
    model = {**TINY, "hidden": 2, "fuse_split": True, "num_joints": 17}
    raw = dict(entries={k: 0.1 + 1.9 * rng.random() for k in fabric_blocks(net, hw)},
               fabric={k: model[k] for k in ("rows", "layers", "channels", "hidden", "eels", "fuse_split",
                                             "stem_blocks", "num_joints")},
               ops=list(OP_NAMES), input_hw=hw, device="cpu", device_name=device_name("cpu"),
               meta={"threads": 1, "batch": 1, "form": "eager"}, source="test table")
    raw.update(fields)
    return LatencyTable(**raw)


def table_sum(table: LatencyTable, net: Supernet, genotype, hw=HW) -> float:
    """Sum of the entries of every block ``genotype``'s network computes, counted by hand: its
    live cells' paths, ops, output conv and element-wise sums, and the stem, Fuse-Split blocks
    and heads."""
    e = table.entries
    sizes = [FabricLayout.row_size(hw, r) for r in range(genotype.rows)]
    total = e[block_key(net.stem, hw)]
    for c in genotype.cells:
        if c.pruned:
            continue
        width, size = genotype.channels * 2 ** c.row, sizes[c.row]
        total += sum(e[path_key(p, width, size)] for p in c.inputs)
        total += sum(e[op_key(o, width, size)] for edge in c.edges for o in edge)
        total += e[output_key(genotype.hidden, width, size)]
        # sums: of the inputs, of the ops on each edge, and of the 2 edges into node 2 (H = 2)
        sums = (len(c.inputs) - 1) + sum(len(edge) - 1 for edge in c.edges) + 1
        total += sums * e[add_key(width, size)]
    for layer in genotype.exit_layers:
        block = net.exits[str(layer)]
        total += e[block_key(block.fuse, sizes[0])] + e[block_key(net.heads[str(layer)], sizes[0])]
        if block.fuse_skip is not None:
            total += e[block_key(block.fuse_skip, sizes[0])]
        if block.split is not None:
            total += e[block_key(block.split, sizes[0])]
    return total


@pytest.fixture(scope="module")
def net() -> Supernet:
    return tiny_supernet()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_expected_latency_of_a_one_hot_sample_is_the_table_sum(net, seed):
    table = random_table(net, seed=seed)
    net.use_latency_table(table)
    try:
        with torch.no_grad():
            net.arch.alpha.normal_(generator=torch.Generator().manual_seed(seed))
            out = net(torch.randn(1, 3, 40, 24), tau=1.0, seed=seed)   # images of any size
    finally:
        net.use_latency_table(None)
        net.arch.alpha.data.zero_()
    assert out.latency is not None
    assert out.latency.item() == pytest.approx(table_sum(table, net, out.genotype), rel=1e-5)
    derived = DerivedNet(out.genotype, stem_blocks=TINY["stem_blocks"])
    assert derived.exit_costs(table, HW)[4] == pytest.approx(out.latency.item(), rel=1e-5)


def test_calibration_scales_every_prediction(net):
    table, scaled = random_table(net), random_table(net, calibration=1.25)
    genotype = net.genotype_of(net.sample(1.0, seed=3))
    derived = DerivedNet(genotype, stem_blocks=TINY["stem_blocks"])
    assert derived.exit_costs(scaled, HW)[4] == pytest.approx(1.25 * table_sum(table, net, genotype))
    net.use_latency_table(scaled)
    try:
        with torch.no_grad():
            latency = net(torch.randn(1, 3, *HW), tau=1.0, seed=3).latency.item()
    finally:
        net.use_latency_table(None)
    assert latency == pytest.approx(1.25 * table_sum(table, net, genotype), rel=1e-5)


def test_expected_latency_reaches_every_arch_parameter(net):
    net.use_latency_table(random_table(net))
    try:
        out = net(torch.randn(2, 3, *HW), tau=1.0, seed=5)
        for p in net.arch_parameters():
            p.grad = None
        out.latency.backward()
    finally:
        net.use_latency_table(None)
    for name, p in zip(("alpha", "beta", "m_alpha", "m_beta"), net.arch_parameters()):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_without_a_table_there_is_no_latency(net):
    assert net(torch.randn(2, 3, *HW), tau=1.0, seed=0).latency is None


# ------------------------------------------------------------------ table checks
def test_table_round_trips_through_json(net, tmp_path):
    table = random_table(net)
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.entries == table.entries and back.input_hw == HW and back.fabric == table.fabric


def test_missing_and_malformed_tables_are_clear_errors(tmp_path):
    with pytest.raises(LatencyTableError, match="not found.*python -m threempose.latency"):
        LatencyTable.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LatencyTableError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": 1, "device": "cpu"}))
    with pytest.raises(LatencyTableError, match="needs keys"):
        LatencyTable.load(tmp_path / "other.json")


def test_a_table_of_another_fabric_is_stale(net):
    fabric = {**random_table(net).fabric, "channels": 8}
    with pytest.raises(LatencyTableError, match=r"stale.*channels 8 \(needed 4\)"):
        net.use_latency_table(random_table(net, fabric=fabric))
    with pytest.raises(LatencyTableError, match=r"stale.*no latency for ops \['se'\]"):
        net.use_latency_table(random_table(net, ops=[o for o in OP_NAMES if o != "se"]))
    assert net.latency_table is None


def test_a_table_of_another_input_size_is_stale(net):
    with pytest.raises(LatencyTableError, match="stale.*32x32.*not 64x64"):
        random_table(net).check_input_size((64, 64))


def test_a_table_of_another_device_is_foreign_unless_asked_for(net):
    gpu_table = random_table(net, device="cuda", device_name="NVIDIA H200")
    with pytest.raises(LatencyTableError, match="foreign.*NVIDIA H200.*this run uses cpu"):
        gpu_table.check_device("cpu")
    with pytest.raises(LatencyTableError, match="foreign"):
        random_table(net, device_name="another CPU").check_device("cpu")
    with pytest.warns(UserWarning, match="not of this run's device.*as asked"):
        gpu_table.check_device("cpu", target="cuda")
    with pytest.raises(LatencyTableError, match="target device is 'cpu'"):
        gpu_table.check_device("cpu", target="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random_table(net).check_device("cpu")          # its own device: silent


# ------------------------------------------------------------------ config and loss
def test_cost_config_defaults_to_gflops_and_validates_latency():
    assert config_from_dict({}).loss.cost.metric == "gflops"
    with pytest.raises(ConfigError, match="needs loss.cost.target"):
        config_from_dict({"loss": {"cost": {"metric": "latency", "lut": "t.json"}}})
    with pytest.raises(ConfigError, match="only used with loss.cost.metric 'latency'"):
        config_from_dict({"loss": {"cost": {"lut": "t.json"}}})
    with pytest.raises(ConfigError, match="must be > 0"):
        config_from_dict({"loss": {"cost": {"metric": "latency", "target": 0.0, "lut": "t.json"}}})


def test_loss_constrains_the_configured_metric():
    exits = [type("E", (), {"heatmaps": torch.zeros(1, 17, 4, 4), "tags": torch.zeros(1, 17, 4, 4)})()]
    targets = {"heatmaps": torch.zeros(1, 17, 4, 4), "mask": torch.ones(1, 4, 4)}
    base = dict(grouping_weight=0.0, teacher_weight=0.0, flops_weight=0.5, flops_scale_start=1.0)
    gflops, latency = torch.tensor(30.0), torch.tensor(12.0)
    _, terms = PoseLoss(LossConfig(**base))(exits, targets, gflops=gflops, latency=latency, epoch=0)
    assert float(terms["flops"]) == pytest.approx((30.0 / 47.8) ** 0.15) and "latency" not in terms
    cfg = config_from_dict({"loss": {**base, "cost": {"metric": "latency", "target": 8.0, "lut": "t"}}}).loss
    total, terms = PoseLoss(cfg)(exits, targets, gflops=gflops, latency=latency, epoch=0)
    assert float(terms["latency"]) == pytest.approx((12.0 / 8.0) ** 0.15) and "flops" not in terms
    assert float(total) == pytest.approx(0.5 * (12.0 / 8.0) ** 0.15)
    with pytest.raises(ValueError, match="no latency/epoch"):
        PoseLoss(cfg)(exits, targets, gflops=gflops, epoch=0)
    assert float(flops_loss(latency, 8.0, 0.15)) == float(terms["latency"])


def test_a_search_with_a_stale_table_fails_before_it_starts(net, tmp_path):
    from threempose.engine.distributed import DistContext
    from threempose.training.search_job import SearchJob

    random_table(net).save(tmp_path / "t.json")        # measured at 32x32
    cfg = config_from_dict({"model": TINY, "data": {"input_size": 64},
                            "loss": {"teacher_weight": 0.0, "cost": {"metric": "latency", "target": 5.0,
                                                                     "lut": str(tmp_path / "t.json")}}})
    with pytest.raises(LatencyTableError, match="stale.*32x32.*not 64x64"):
        SearchJob(cfg, DistContext())
    cfg.model.channels = 8
    with pytest.raises(LatencyTableError, match=r"channels 4 \(needed 8\)"):
        SearchJob(cfg, DistContext())


# ------------------------------------------------------------------ the command
def test_latency_command_measures_every_block_once(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": TINY}))
    out = tmp_path / "lut.json"
    assert latency_main(["--device", "cpu", "--input-size", "32", "--config", str(config), "--out", str(out),
                         "--warmup", "0", "--reps", "2", "--threads", "1", "--timer", "cpu"]) == 0
    assert latency_main(["--device", "cpu", "--input-size", "32", "--config", str(config), "--out",
                         str(tmp_path / "eager.json"), "--warmup", "0", "--reps", "1", "--form", "eager"]) == 0
    assert json.loads((tmp_path / "eager.json").read_text())["form"] == "eager"
    raw = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "threads", "batch", "input_size", "method", "form"):
        assert key in raw, key
    assert raw["form"] == "deploy" and raw["threads"] == 1 and raw["method"]["timer"] == "cpu"
    assert raw["calibration"] > 0 and len(raw["calibration_ratios"]) == 4
    table = LatencyTable.load(out)
    net = Supernet(ModelConfig(**TINY, ops=list(OP_NAMES)))
    assert set(table.entries) == set(fabric_blocks(net, HW))   # the registry's ops, each key once
    assert all(v > 0 for k, v in table.entries.items() if not k.startswith(("op:identity", "path:parallel")))
    # 3 rows x (every registry op + output + add) + 7 paths (2 + 3 + 2) + stem + fuse +
    # fuse_skip + split + head (the three exits fuse the same rows: one key each)
    assert len(table.entries) == 3 * (len(OP_NAMES) + 2) + 7 + 5
    net = tiny_supernet()
    net.use_latency_table(table)
    assert net(torch.randn(2, 3, *HW), tau=1.0, seed=0).latency.item() > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_blocks_and_networks_are_timed_in_the_form_inference_runs():
    """The default form is deploy.optimize_for_inference's (as Predictor runs): a block is
    optimized on its own channels-last inputs (BatchNorm folded, convs packed, same outputs,
    channels-last out for the next block), a whole network as from images; eager keeps BN."""
    from threempose.inference.onednn_fusion import PackedConv2d
    from threempose.measure.latency import FORM, feature_layout, inference_form

    assert FORM == "deploy"
    net = tiny_supernet().eval()
    for name in ("conv", "residual", "sep_conv", "se"):
        op = net.cells["0"].edges[0][name]
        x = feature_layout(torch.randn(1, 4, 16, 16))
        fast = inference_form(op, HW, "cpu", (x,))
        assert fast is not op and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()), name
        assert any(isinstance(m, PackedConv2d) for m in fast.modules()), name
        with torch.no_grad():
            expected, got = op(x), fast(x)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), name
        assert got.is_contiguous(memory_format=torch.channels_last), name
    genotype = net.genotype_of(net.sample(1.0, seed=1))
    whole = inference_form(DerivedNet(genotype, stem_blocks=1), HW, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in whole.modules())
    op = net.cells["0"].edges[0]["conv"]
    assert inference_form(op, HW, "cpu", form="eager") is op and any(
        isinstance(m, torch.nn.BatchNorm2d) for m in op.modules())
    with pytest.raises(ValueError, match="unknown form 'fast'"):
        inference_form(op, HW, "cpu", form="fast")


def test_profile_measures_in_the_tables_form(net, tmp_path, monkeypatch):
    from threempose.measure import profile
    from threempose.measure.profile import measure_latency

    forms = []
    monkeypatch.setattr(profile, "network_ms",
                        lambda *args, form, **kw: forms.append(form) or {"net": {2: 1.0}})
    genotype = net.genotype_of(net.sample(1.0, seed=2))
    for form in ("eager", "deploy"):
        measure_latency(genotype, random_table(net, meta={"threads": 1, "batch": 1, "form": form}))
    assert forms == ["eager", "deploy"]


@pytest.mark.skipif(cpu_bf16_missing() is not None, reason="no native bf16 on this CPU")
def test_bf16_table_times_bf16_blocks_and_is_checked_against_the_target_precision(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": TINY}))
    out = tmp_path / "bf16.json"
    assert latency_main(["--device", "cpu", "--input-size", "32", "--config", str(config), "--out", str(out),
                         "--warmup", "0", "--reps", "1", "--threads", "1", "--precision", "bf16"]) == 0
    table = LatencyTable.load(out)
    assert table.precision == "bf16" and "bf16" in capsys.readouterr().out
    table.check_precision("bf16")
    with pytest.raises(LatencyTableError, match="measured in bf16, but the target precision is fp32"):
        table.check_precision("fp32")
    blocks = fabric_blocks(Supernet(ModelConfig(**TINY)).eval(), (32, 32), precision="bf16")
    with torch.inference_mode():
        out_block = blocks[next(k for k in blocks if k.startswith("op:conv:"))]()
    assert out_block.dtype == torch.bfloat16                   # features flow between blocks in bf16


def test_int8_latency_table_is_a_one_line_error(tmp_path, capsys):
    assert latency_main(["--device", "cpu", "--input-size", "32", "--precision", "int8",
                         "--out", str(tmp_path / "x.json")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8 latency tables are not measured" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_latency_command_rejects_the_cpu_timer_with_threads(tmp_path, capsys):
    assert latency_main(["--device", "cpu", "--input-size", "32", "--threads", "2", "--timer", "cpu",
                         "--out", str(tmp_path / "x.json")]) == 2
    assert "one thread" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_prediction_accuracy_against_hand_computed_values():
    from threempose.measure.latency import prediction_accuracy

    acc = prediction_accuracy([1.0, 2.0, 4.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert acc["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))          # d^2 = 0 + 0 + 1 + 1
    assert acc["mae"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)
    assert acc["bias"] == pytest.approx((0 + 0 + 1 / 3 - 1 / 4) / 4)
    with pytest.raises(ValueError, match="equally long"):
        prediction_accuracy([1.0], [1.0, 2.0])


def test_profile_prints_predicted_and_measured_latency_per_exit(tmp_path, capsys):
    from threempose.measure.latency import build_table
    from threempose.profile import main as profile_main

    lut, genotype_path = tmp_path / "lut.json", tmp_path / "g.json"
    build_table(ModelConfig(**TINY), HW, warmup=0, reps=2, timer="cpu").save(lut)
    net = tiny_supernet()
    genotype = net.genotype_of(net.sample(1.0, seed=4))
    genotype.save(genotype_path)
    predicted = DerivedNet(genotype, stem_blocks=1).exit_costs(LatencyTable.load(lut), HW)
    assert profile_main(["--genotype", str(genotype_path), "--input-size", "32", "--latency", str(lut),
                         "--measure"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "predicted ms" in lines[1] and "measured ms" in lines[1]
    for line, layer in zip(lines[2:5], (2, 3, 4)):
        cells = line.split()
        assert int(cells[0]) == layer and float(cells[3]) == pytest.approx(predicted[layer], abs=0.006)
        assert float(cells[4]) > 0
    assert profile_main(["--genotype", str(genotype_path), "--input-size", "64", "--latency", str(lut)]) == 2
    assert "stale" in capsys.readouterr().err
