"""Candidate ops, input paths and the cell: shapes, wiring, and analytic cost vs FlopCounterMode."""
import pytest
import torch

from threempose.config import CellOptions
from threempose.util.flops import measure_gflops
from threempose.nas.cell import AbovePath, BelowPath, Cell, CellChoice, ParallelPath
from threempose.nas.genotype import OP_LABELS
from threempose.nas.ops import OP_NAMES, make_op


def measured_macs(fn) -> float:
    return measure_gflops(fn) * 1e9


def test_op_names_are_the_genotype_schema_names():
    assert OP_NAMES == ("identity", "conv", "avg_pool", "max_pool", "residual", "sep_conv", "csi",
                        "zoom_conv", "se", "zero", "dil_conv")
    assert set(OP_LABELS) == set(OP_NAMES)          # every op has a Table A.1-style label


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("hw", [(8, 6), (7, 5), (1, 3)])
def test_op_keeps_shape_and_its_macs_equal_flop_counter(name, hw):
    op = make_op(name, 6).eval()
    x = torch.randn(1, 6, *hw)
    assert op(x).shape == x.shape
    assert op.macs(*hw) == pytest.approx(measured_macs(lambda: op(x)), abs=0.5)


def test_op_macs_closed_forms():
    c, h, w = 8, 10, 7
    assert make_op("conv", c).macs(h, w) == 9 * c * c * h * w
    assert make_op("residual", c).macs(h, w) == 18 * c * c * h * w
    assert make_op("sep_conv", c).macs(h, w) == (9 * c + c * c) * h * w
    assert make_op("csi", c).macs(h, w) == c * c * h * w
    assert make_op("zoom_conv", c).macs(h, w) == 9 * c * c * 5 * 4        # ceil(10/2) x ceil(7/2)
    assert make_op("se", c).macs(h, w) == 2 * c * (c // 4)
    assert make_op("dil_conv", c).macs(h, w) == (9 * c + c * c) * h * w
    for free in ("identity", "avg_pool", "max_pool", "zero"):
        assert make_op(free, c).macs(h, w) == 0


def test_zero_is_zero_and_passes_no_gradient():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = make_op("zero", 3)(x)
    assert torch.equal(y, torch.zeros_like(x)) and not y.requires_grad
    assert not list(make_op("zero", 3).parameters())


def test_dil_conv_is_a_depthwise_rate_2_conv_then_a_pointwise_conv():
    """One impulse through the depthwise conv alone (identity pointwise, BN off in eval with
    unit statistics): the response sits on the 3x3 grid of stride 2 around the impulse, i.e.
    a 5x5 receptive field with holes."""
    op = make_op("dil_conv", 1).eval()
    depthwise, pointwise = [m for m in op.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (depthwise.dilation, depthwise.groups, depthwise.kernel_size) == ((2, 2), 1, (3, 3))
    assert pointwise.kernel_size == (1, 1)
    with torch.no_grad():
        depthwise.weight.fill_(1.0)
        pointwise.weight.fill_(1.0)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    hit = op(x)[0, 0] > 0
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7:2, 2:7:2] = True
    assert torch.equal(hit, expected)


def test_cell_options_set_the_se_squeeze_and_the_separable_pairs():
    c, h, w = 16, 6, 5
    se = make_op("se", c, CellOptions(se_reduction=16))
    assert se.fc1.out_channels == 1 and se.macs(h, w) == 2 * c * 1
    assert sum(p.numel() for p in se.parameters()) == 2 * c * 1 + 1 + c      # two 1x1 convs with bias
    sep = make_op("sep_conv", c, CellOptions(sep_conv_repeats=2)).eval()
    x = torch.randn(1, c, h, w)
    assert sep.macs(h, w) == 2 * (9 * c + c * c) * h * w
    assert sep.macs(h, w) == pytest.approx(measured_macs(lambda: sep(x)), abs=0.5)
    assert make_op("dil_conv", c, CellOptions(sep_conv_repeats=2)).macs(h, w) == (9 * c + c * c) * h * w


@pytest.mark.parametrize("hidden_sum", [False, True])
def test_hidden_sum_adds_eq_3_6s_earlier_nodes(hidden_sum):
    """Edges I->h1 identity, I->h2 zero, h1->h2 zero: h2 is 0, or h1 (= I) with Eq. 3.6's sum."""
    cell = Cell(4, {"parallel": 4}, [["identity"], ["zero"], ["zero"]], 2,
                options=CellOptions(hidden_sum=hidden_sum)).eval()
    x = torch.randn(2, 4, 5, 6)
    h2 = x if hidden_sum else torch.zeros_like(x)
    torch.testing.assert_close(cell({"parallel": x}, (5, 6)), cell.output(torch.cat([x, h2], dim=1)))


def test_unknown_op_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'dilated_conv'"):
        make_op("dilated_conv", 4)


@pytest.mark.parametrize("hw", [(9, 7), (8, 6)])
def test_paths_bring_neighbours_to_the_row_scale_and_width(hw):
    h, w = hw
    above, below = AbovePath(4, 8).eval(), BelowPath(16, 8).eval()
    x_above = torch.randn(1, 4, 2 * h - 1, 2 * w)       # odd sizes round up through stride 2
    x_below = torch.randn(1, 16, (h + 1) // 2, (w + 1) // 2)
    assert above(x_above, (h, w)).shape == (1, 8, h, w)
    assert below(x_below, (h, w)).shape == (1, 8, h, w)
    assert above.macs(h, w) == pytest.approx(measured_macs(lambda: above(x_above, (h, w))))
    assert below.macs(h, w) == pytest.approx(measured_macs(lambda: below(x_below, (h, w))))
    x = torch.randn(1, 8, h, w)
    assert ParallelPath(8, 8)(x, (h, w)) is x


def test_cell_wires_hidden_nodes_as_table_a1():
    """h1 = O0(I), h2 = O1(I) + O2(h1), out = BN(conv1x1(concat(h1, h2))): with identities,
    h1 = I and h2 = 2 I; with parallel + below inputs, I = x + up(proj(below))."""
    torch.manual_seed(0)
    cell = Cell(4, {"parallel": 4, "below": 8}, [["identity"]] * 3, hidden=2).eval()
    x, xb = torch.randn(2, 4, 6, 5), torch.randn(2, 8, 3, 3)
    i = x + cell.inputs["below"](xb, (6, 5))
    expected = cell.output(torch.cat([i, 2 * i], dim=1))
    torch.testing.assert_close(cell({"parallel": x, "below": xb}, (6, 5)), expected)


def test_cell_choice_runs_only_chosen_ops_with_their_weights():
    torch.manual_seed(0)
    cell = Cell(4, {"parallel": 4}, [["identity", "max_pool"], ["identity", "avg_pool"], ["identity"]],
                hidden=2).eval()
    x = torch.randn(1, 4, 5, 5)
    choice = CellChoice(paths=["parallel"], path_weights=torch.tensor([1.0]),
                        edges=[["max_pool"], ["identity", "avg_pool"], ["identity"]],
                        edge_weights=[torch.tensor([0.5]), torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    h1 = 0.5 * torch.nn.functional.max_pool2d(x, 3, 1, 1)
    pool = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    h2 = x + 2.0 * pool(x) + 3.0 * h1
    torch.testing.assert_close(cell({"parallel": x}, (5, 5), choice), cell.output(torch.cat([h1, h2], 1)))


def test_cell_without_choice_needs_exactly_its_inputs():
    cell = Cell(4, {"above": 2}, [["identity"]] * 3, hidden=2, name="cell 7 (layer 3, row 2)")
    with pytest.raises(ValueError, match="cell 7"):
        cell({"parallel": torch.randn(1, 4, 4, 4)}, (4, 4))
