"""FLOPs convention: a conv's multiply-adds, counted by hand."""
from torch import nn

from threempose.data.keypoints import FLIP_PAIRS, JOINT_NAMES, flip_index
from threempose.util.flops import count_params, model_gflops


def test_conv_multiply_adds_match_closed_form():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 output maps of 10x12, each output pixel = 3*3*3 multiply-adds.
    expected = 8 * 10 * 12 * 3 * 3 * 3 / 1e9
    assert abs(model_gflops(conv, (10, 12)) - expected) < 1e-15
    assert count_params(conv) == 8 * 3 * 3 * 3


def test_flip_index_swaps_left_and_right_names():
    perm = flip_index()
    for j, name in enumerate(JOINT_NAMES):
        other = JOINT_NAMES[perm[j]]
        if "left" in name:
            assert other == name.replace("left", "right")
        elif "right" in name:
            assert other == name.replace("right", "left")
        else:
            assert other == name
    assert len(FLIP_PAIRS) == 8
