"""Building blocks shared by the four networks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .sdn import SDN, ResSDN


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class VGGBlock(nn.Sequential):
    """[conv3x3 -> BN -> ReLU] x 2 (bias on, padding 1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*conv_bn_relu(in_channels, out_channels), *conv_bn_relu(out_channels, out_channels))


class SDNBlock(nn.Sequential):
    """VGG block whose second conv is an (Res)SDN layer: conv3x3-BN-ReLU-(Res)SDN-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, state: int = 150,
                 directions: Sequence[int] = (0, 2), residual: bool = True, impl: str = "auto"):
        layer = ResSDN if residual else SDN
        super().__init__(
            *conv_bn_relu(in_channels, out_channels),
            layer(out_channels, out_channels, state, directions, 3, impl),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def make_block(in_channels: int, out_channels: int, sdn: bool, sdn_kwargs: dict) -> nn.Module:
    """A plain VGG block, or an SDN block when ``sdn`` is true."""
    return SDNBlock(in_channels, out_channels, **sdn_kwargs) if sdn else VGGBlock(in_channels, out_channels)


def upsample2x() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
