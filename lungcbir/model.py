"""The U-Net: encoder, bottleneck, decoder; a pure ``nn.Module`` configured by a dataclass.

The architecture follows the original U-Net (Ronneberger et al. 2015): blocks of two 3x3
convolutions with ReLU (plus batch norm), 2x2 max-pooling on the way down, 2x2 transposed
convolutions on the way up, skip connections by concatenation and a final 1x1 convolution.
``UNet.encode`` returns the bottleneck so the feature extractor can read it without running
the decoder.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the network.

    Example:
        >>> UNetConfig(base_channels=16, depth=4).bottleneck_channels
        256
    """

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4  # number of 2x2 poolings; the input side must be divisible by 2**depth
    # > 0: a lesion branch, its own copy of the last ``lesion_levels`` decoder levels (fed by the
    # shared decoder levels before them and by the same skips) and a 1x1 head, adds a lesion output
    # channel after the ``out_channels`` ones; trained on frozen lung weights it cannot change the
    # lung output or the bottleneck
    lesion_levels: int = 0
    # the lesion branch's levels have 1/``lesion_width_divisor`` of the channels of the lung levels
    # they copy (the skips they read keep their width): a lesion map needs less than a lung
    # boundary, and the branch's cost falls about threefold at 2
    lesion_width_divisor: int = 1

    @property
    def lesion_branch(self) -> bool:
        return self.lesion_levels > 0

    @property
    def bottleneck_channels(self) -> int:
        return self.base_channels * 2**self.depth

    def to_dict(self) -> dict:
        return asdict(self)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net for binary lung segmentation with an exposed encoder bottleneck.

    Example:
        >>> net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
        >>> x = torch.zeros(1, 1, 32, 32)
        >>> net(x).shape, net.encode(x)[-1].shape
        (torch.Size([1, 1, 32, 32]), torch.Size([1, 16, 8, 8]))
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.down_blocks = nn.ModuleList()
        previous = config.in_channels
        for width in widths[:-1]:
            self.down_blocks.append(DoubleConv(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        self.up_convs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up_convs.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.up_blocks.append(DoubleConv(width * 2, width))
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)
        if not 0 <= config.lesion_levels <= config.depth:
            raise ValueError(f"lesion_levels must be between 0 and depth ({config.depth})")
        if config.lesion_branch:
            copied = list(reversed(widths[:-1]))[config.depth - config.lesion_levels:]
            if config.lesion_width_divisor < 1 or any(w % config.lesion_width_divisor for w in copied):
                raise ValueError(f"lesion_width_divisor must divide the branch's widths {copied}")
            narrow = [w // config.lesion_width_divisor for w in copied]
            inputs = [copied[0] * 2] + narrow[:-1]  # the shared decoder's output, then the branch's own
            self.lesion_up_convs = nn.ModuleList(nn.ConvTranspose2d(i, n, 2, stride=2) for i, n in zip(inputs, narrow))
            self.lesion_up_blocks = nn.ModuleList(DoubleConv(n + w, n) for n, w in zip(narrow, copied))
            self.lesion_head = nn.Conv2d(narrow[-1], 1, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder; returns the skip tensors followed by the bottleneck (last)."""
        skips = []
        for block in self.down_blocks:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        return skips + [self.bottleneck(x)]

    def decode(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """Turn the encoder outputs into per-pixel logits."""
        shared, skips = self.shared_decode(encoded)
        if not self.config.lesion_branch:
            return self.lung_logits(shared, skips)
        return torch.cat([self.lung_logits(shared, skips), self.lesion_logits(shared, skips)], dim=1)

    def shared_decode(self, encoded: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder levels the lung and lesion outputs share, and the skips of the levels after
        them (coarsest first): everything the lesion branch reads."""
        *skips, x = encoded
        levels = list(zip(self.up_convs, self.up_blocks, reversed(skips)))
        shared = len(levels) - self.config.lesion_levels
        for up_conv, block, skip in levels[:shared]:
            x = block(torch.cat([up_conv(x), skip], dim=1))
        return x, [skip for _, _, skip in levels[shared:]]

    def lung_logits(self, shared: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The lung decoder's last levels and head alone, on what :meth:`shared_decode` returns."""
        lungs = shared
        first = self.config.depth - self.config.lesion_levels
        for up_conv, block, skip in zip(self.up_convs[first:], self.up_blocks[first:], skips):
            lungs = block(torch.cat([up_conv(lungs), skip], dim=1))
        return self.head(lungs)

    def lesion_logits(self, shared: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The lesion branch alone, on what :meth:`shared_decode` returns."""
        lesions = shared
        for up_conv, block, skip in zip(self.lesion_up_convs, self.lesion_up_blocks, skips):
            lesions = block(torch.cat([up_conv(lesions), skip], dim=1))
        return self.lesion_head(lesions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def lesion_modules(self) -> list[nn.Module]:
        """The lesion branch's modules (empty without one)."""
        if not self.config.lesion_branch:
            return []
        return [self.lesion_up_convs, self.lesion_up_blocks, self.lesion_head]

    def copy_decoder_into_lesion_branch(self) -> None:
        """Start the lesion branch from the lung decoder's last levels (the head stays as it is):
        features that already know the lungs learn lesions far faster than fresh ones."""
        if self.config.lesion_width_divisor != 1:
            raise ValueError("a narrower lesion branch cannot start as a copy of the lung decoder")
        shared = self.config.depth - self.config.lesion_levels
        for index in range(self.config.lesion_levels):
            self.lesion_up_convs[index].load_state_dict(self.up_convs[shared + index].state_dict())
            self.lesion_up_blocks[index].load_state_dict(self.up_blocks[shared + index].state_dict())

    def forward_with_bottleneck(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and bottleneck from one pass, so indexing does not run the encoder twice."""
        encoded = self.encode(x)
        return self.decode(encoded), encoded[-1]


def fuse_batch_norm(network: UNet) -> UNet:
    """An inference copy with each batch norm folded into the convolution before it.

    Same outputs (up to rounding), about a fifth faster on CPU; the copy is for evaluation only.

    Example:
        >>> net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
        >>> x = torch.rand(1, 1, 32, 32)
        >>> torch.allclose(net(x), fuse_batch_norm(net)(x), atol=1e-5)
        True
    """
    fused = copy.deepcopy(network).eval()
    for block in fused.modules():
        if isinstance(block, DoubleConv):
            for index in (0, 3):  # conv, batch norm, ReLU, conv, batch norm, ReLU
                # DoubleConv is an nn.Sequential of Conv2d, BatchNorm2d, ReLU (twice): indexing it
                # gives plain Modules to the type checker
                conv, norm = cast(nn.Conv2d, block[index]), cast(nn.BatchNorm2d, block[index + 1])
                block[index] = fuse_conv_bn_eval(conv, norm)
                block[index + 1] = nn.Identity()
    return fused
