"""Convolution cases (data) shared by the TN engine tests: every simplification branch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    """One (transposed) convolution: input shape and hyperparameters."""

    id: str
    x_shape: tuple[int, ...]  # [N, C_in, *spatial] (ConvTranspose input for transpose=True)
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: object = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    c_out: int = 4
    transpose: bool = False
    output_padding: int | tuple[int, ...] = 0
    tags: tuple[str, ...] = field(default=())

    def kwargs(self) -> dict:
        """Hyperparameter keywords of the factor functions."""
        out = dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        if self.transpose:
            out.update(transpose=True, output_padding=self.output_padding)
        return out


CONV_CASES = [
    Case("1d_k3", (2, 3, 9), 3),
    Case("1d_s2_p2_d2_g2", (2, 4, 11), 3, stride=2, padding=2, dilation=2, groups=2),
    Case("1d_same_even", (2, 3, 8), 4, padding="same"),
    Case("2d_3x3_p1", (2, 3, 6, 5), 3, padding=1),
    Case("2d_1x1", (2, 4, 5, 5), 1),
    Case("2d_patchify_k4s4", (2, 3, 8, 8), 4, stride=4),
    Case("2d_patchify_nondivisible", (2, 3, 9, 10), 4, stride=4),
    Case("2d_2x2_s2", (2, 4, 6, 6), 2, stride=2),
    Case("2d_1x1_s2", (2, 4, 7, 7), 1, stride=2),
    Case("2d_down_k2s3_divisible", (2, 2, 9, 9), 2, stride=3),
    Case("2d_down_k2s3_nondivisible", (2, 2, 10, 11), 2, stride=3),
    Case("2d_1x7_mixed", (2, 3, 5, 9), (1, 7), padding=(0, 3)),
    Case("2d_depthwise", (2, 4, 6, 6), 3, padding=1, groups=4, c_out=8),
    Case("2d_groups_s2_d2_padpairs", (2, 4, 9, 8), 3, 2, ((1, 2), (0, 1)), (2, 1), 2),
    Case("2d_same_asym_dil", (2, 2, 6, 7), (2, 4), padding="same", dilation=(1, 2)),
    Case("2d_valid", (2, 2, 5, 6), (2, 3), padding="valid"),
    Case("3d_mixed", (2, 2, 4, 5, 3), (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0)),
    Case("3d_dense", (1, 2, 4, 4, 4), 2, stride=2),
    Case("3d_same_g2", (1, 4, 3, 4, 3), 3, padding="same", groups=2),
    # real CNN layers at small spatial size (design.md §5)
    Case("resnet18_stem_7x7s2p3", (2, 3, 16, 16), 7, stride=2, padding=3, c_out=8),
    Case("3c3d_conv1_5x5", (2, 3, 12, 12), 5, c_out=8),
    Case("allcnnc_3x3s2", (2, 6, 8, 8), 3, stride=2),
    Case("allcnnc_1x1", (2, 6, 5, 5), 1),
    Case("inception_7x1", (2, 4, 7, 7), (7, 1), padding=(3, 0)),
    Case("resnet18_downsample_1x1s2", (2, 4, 8, 8), 1, stride=2, c_out=8),
]

TRANSPOSE_CASES = [
    Case("t1d_s2_p1_op1", (2, 3, 5), 3, stride=2, padding=1, transpose=True, output_padding=1),
    Case(
        "t2d_g2_op",
        (2, 4, 4, 3),
        (3, 2),
        stride=(2, 1),
        padding=(1, 0),
        groups=2,
        transpose=True,
        output_padding=(1, 0),
    ),
    Case("t2d_dil2_op1_ge_stride", (2, 2, 4, 4), 2, dilation=2, transpose=True, output_padding=1),
    Case("t2d_dense_k2s2", (2, 3, 3, 4), 2, stride=2, transpose=True),
    Case("t3d_k2s2_p1", (1, 2, 3, 2, 3), 2, stride=2, padding=(1, 0, 0), transpose=True),
    Case("t2d_depthwise", (2, 3, 3, 3), 3, stride=2, padding=1, groups=3, c_out=3, transpose=True),
]

FOUR_D_CASE = Case(
    "4d", (1, 2, 3, 4, 3, 3), (2, 1, 2, 3), stride=(1, 2, 1, 1), padding=(0, 1, 1, 0)
)
FOUR_D_TRANSPOSE_CASE = Case(
    "t4d",
    (1, 2, 2, 3, 2, 2),
    (2, 1, 2, 2),
    stride=(1, 2, 1, 2),
    padding=(0, 0, 1, 0),
    transpose=True,
)


def ids(cases):
    """Readable test ids."""
    return [c.id for c in cases]
