"""MobileNetV2-style student: a small encoder-decoder designed for CPU speed, 2D and 3D.

Why it looks like this: a narrow plain U-Net is barely faster than its teacher on a CPU because its full-resolution
stages dominate the run time. Here the only work done at full resolution is one cheap convolution of the input (a
skip that keeps 1-3 px structures such as retinal vessels) and one depthwise-separable refinement before the 1x1
head; everything else runs from stride 2 on, with inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1)
and an additive (FPN-like) decoder, which costs less than concatenation.

Layout for ``stem_stride=2, depth=4`` (strides in brackets; see ``common`` for the naming convention)::

    enc0 [1]          = conv3x3(x)                          full-resolution skip
    enc1 [2]          = IR(conv3x3/2(x))                    stem; its blocks do not expand
    enc2 [4], enc3 [8], bottleneck [16]
                      = IR/2 then IR, each level            IR: inverted residual, /2: stride 2
    dec3 [8]          = IR(up(1x1(bottleneck)) + enc3)      additive skip; the 1x1 runs on the coarse map
    dec2 [4], dec1 [2]  likewise
    dec0 [1]          = dwsep3x3(up(1x1(dec1)) + enc0)      full-resolution refinement
    logits [1]        = 1x1(dec0)

Normalisation defaults to BatchNorm: at inference it is a per-channel affine map (foldable into the convolution),
whereas InstanceNorm computes statistics over the whole image on every call. With very small batches choose
``norm="group"`` or ``"instance"``. Built from plain torch layers, not MONAI blocks, so that loading a student for
inference does not import MONAI (about 2 s of start-up on 2 CPU cores); the blocks are three standard layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from KDSegmentationLib.models.blocks import crop_to, feature_size, pad_to_multiple, upsample


def _conv_type(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


class _VectorCounter:
    """BatchNorm whose ``num_batches_tracked`` counter is a 1-element vector instead of a 0-dim tensor.

    The model file's checksum views every tensor as bytes, which torch refuses for 0-dim tensors of multi-byte
    types; the counter is only read when ``momentum`` is None (never here), and SyncBatchNorm conversion and
    ``reset_running_stats`` work the same with a 1-element vector.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        self.num_batches_tracked = self.num_batches_tracked.reshape(1)


class BatchNorm2d(_VectorCounter, nn.BatchNorm2d):
    pass


class BatchNorm3d(_VectorCounter, nn.BatchNorm3d):
    pass


def make_norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer by name: 'batch', 'instance' (affine), 'group' (up to 8 groups) or 'none'."""
    if kind == "batch":
        return (BatchNorm2d if spatial_dims == 2 else BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose batch, instance, group or none")


class ConvNormAct(nn.Module):
    """Conv (no bias: the norm has one) + norm + optional ReLU6. (B, Cin, *S) -> (B, Cout, *S/stride).

    In eval mode a BatchNorm is folded into the convolution on the fly (weight * gamma / sigma, shifted bias): one
    pass over the feature map instead of two, which on a CPU saves about a fifth of the student's run time. The
    folding is recomputed on every call from the current weights, so nothing is cached and the state_dict is
    unchanged.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1, norm: str = "batch", act: bool = True):
        super().__init__()
        self.conv = _conv_type(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                             padding=kernel_size // 2, groups=groups, bias=(norm == "none"))
        self.norm = make_norm(norm, spatial_dims, out_channels)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not self.training and isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            shape = (-1,) + (1,) * (self.conv.weight.dim() - 1)
            weight = self.conv.weight * scale.reshape(shape)
            bias = norm.bias - norm.running_mean * scale
            return self.act(self.conv._conv_forward(x, weight, bias))
        return self.act(norm(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when expansion is 1), depthwise 3x3 (stride), linear 1x1 project.

    (B, Cin, *S) -> (B, Cout, *S/stride); the input is added back when stride is 1 and Cin == Cout. The projection
    has no activation (MobileNetV2's "linear bottleneck": ReLU on a narrow layer destroys information).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 expansion: float = 4, norm: str = "batch"):
        super().__init__()
        hidden = max(1, int(round(in_channels * expansion)))
        layers: List[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvNormAct(spatial_dims, in_channels, hidden, 1, norm=norm))
        layers.append(ConvNormAct(spatial_dims, hidden, hidden, 3, stride=stride, groups=hidden, norm=norm))
        layers.append(ConvNormAct(spatial_dims, hidden, out_channels, 1, norm=norm, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _level_plan(depth: int, stem_stride: int, width: int, channels, blocks):
    """(log2 stride of the stem, channels per level, blocks per level), checked against ``depth``."""
    if stem_stride not in (1, 2, 4):
        raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
    first = {1: 0, 2: 1, 4: 2}[stem_stride]  # log2 of the stem's stride
    if depth <= first:
        raise ValueError(f"depth ({depth}) must exceed log2(stem_stride) ({first})")
    n_levels = depth - first + 1
    if channels is None:
        channels = [width * (i + 1) for i in range(n_levels)]
    channels = [int(c) for c in channels]
    if len(channels) != n_levels:
        raise ValueError(f"channels needs {n_levels} entries (stem level to bottleneck), got {len(channels)}")
    blocks = [int(blocks)] * n_levels if isinstance(blocks, int) else [int(b) for b in blocks]
    if len(blocks) != n_levels:
        raise ValueError(f"blocks needs {n_levels} entries, got {len(blocks)}")
    return first, channels, blocks


class MobileStudent(nn.Module):
    """MobileNetV2-style encoder-decoder student.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels and classes (logits, background included).
        width: channels of the first (stem) level; level ``i`` (0 = stem) has ``width * (i + 1)`` channels unless
            ``channels`` lists them explicitly. Linear rather than doubling growth keeps the deep 1x1 convolutions
            (which hold most parameters) small.
        depth: number of halvings: the bottleneck is at stride ``2**depth``; inputs are padded to that multiple.
        expansion: expansion factor of the encoder's inverted residual blocks (not of the stem level's: see below).
        stem_stride: 1, 2 or 4: stride of the stem (the first level with encoder blocks).
        channels: optional explicit channels per level, from the stem level to the bottleneck.
        blocks: stride-1 inverted residual blocks after each level's entry (int, or one per level).
        decoder_expansion: expansion of the decoder's inverted residual blocks (cheaper than the encoder's).
        full_res_channels: channels of the full-resolution path (input skip 'enc0' + refinement 'dec0'); 0 disables
            it: the head then runs at the stem's stride and its logits are upsampled (cheapest, fine for big organs).
        norm: 'batch' (default, fastest inference), 'group', 'instance' or 'none'.
        upsample_mode: decoder upsampling, 'linear' (default) or 'nearest' (cheaper for large 3D maps).

    The stem level's blocks (encoder and decoder) never expand: its maps are the largest. 2D inputs on CPU run in
    channels-last layout (faster depthwise convolutions); the logits are returned contiguous, the features in that
    layout.

    ``forward(x)`` -> logits (B, out_channels, *x.shape[2:]) for any input size;
    ``forward(x, return_features=True)`` -> (logits, OrderedDict name -> (B, feature_channels[name], *ceil(S/stride))).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, width: int = 16,
                 depth: int = 4, expansion: float = 4, stem_stride: int = 2,
                 channels: Optional[Sequence[int]] = None, blocks: Union[int, Sequence[int]] = 1,
                 decoder_expansion: float = 2, full_res_channels: int = 8, norm: str = "batch",
                 upsample_mode: str = "linear"):
        super().__init__()
        first, channels, blocks = _level_plan(depth, stem_stride, width, channels, blocks)
        if first == 0:
            full_res_channels = 0  # the stem already runs at full resolution
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.upsample_mode = upsample_mode
        self.multiple = 2 ** depth
        self.levels = list(range(first, depth + 1))  # log2 strides of the encoder levels
        self._enc_names = [f"enc{k}" for k in self.levels[:-1]] + ["bottleneck"]
        # creation order is kept (full-res skip, encoder, decoder, refinement, head): it fixes the seeded init
        # full-resolution input skip: one cheap conv, the only place the net sees every pixel before the end
        self.full_res = ConvNormAct(spatial_dims, in_channels, full_res_channels, 3, norm=norm) \
            if full_res_channels else None
        self.encoder = self._build_encoder(channels, blocks, stem_stride, expansion, norm)
        self.laterals, self.decoder = self._build_decoder(channels, decoder_expansion, norm)
        head_in = self._build_refinement(channels[0], full_res_channels, norm)
        self.head = _conv_type(spatial_dims)(head_in, out_channels, 1)
        self._register_features(channels, full_res_channels)

    def _build_encoder(self, channels, blocks, stem_stride, expansion, norm) -> nn.ModuleList:
        dims = self.spatial_dims
        encoder = nn.ModuleList()
        for i in range(len(self.levels)):
            stage: List[nn.Module] = []
            if i == 0:
                stage.append(ConvNormAct(dims, self.in_channels, channels[0], 3, stride=min(2, stem_stride),
                                         norm=norm))
                if stem_stride == 4:
                    stage.append(InvertedResidual(dims, channels[0], channels[0], 2, 1, norm))
            else:
                stage.append(InvertedResidual(dims, channels[i - 1], channels[i], 2, expansion, norm))
            # at the stem level the blocks do not expand (MobileNetV2's first bottleneck, t = 1): this level has
            # the most pixels, and an expanded block here would cost more than the rest of the network
            level_expansion = 1 if i == 0 else expansion
            stage += [InvertedResidual(dims, channels[i], channels[i], 1, level_expansion, norm)
                      for _ in range(blocks[i])]
            encoder.append(nn.Sequential(*stage))
        return encoder

    def _build_decoder(self, channels, decoder_expansion, norm):
        """Lateral 1x1 at the coarse level (cheaper than after upsampling), add the skip, one IR block per level."""
        laterals, decoder = nn.ModuleList(), nn.ModuleList()
        for i in range(len(self.levels) - 2, -1, -1):
            laterals.append(ConvNormAct(self.spatial_dims, channels[i + 1], channels[i], 1, norm=norm, act=False))
            level_expansion = 1 if i == 0 else decoder_expansion  # the stem level is the largest: no expansion
            decoder.append(InvertedResidual(self.spatial_dims, channels[i], channels[i], 1, level_expansion, norm))
        return laterals, decoder

    def _build_refinement(self, stem_channels: int, full_res_channels: int, norm) -> int:
        """Full-resolution refinement when there is a full-resolution skip; returns the head's input channels."""
        if self.full_res is None:
            return stem_channels
        dims, c = self.spatial_dims, full_res_channels
        self.full_res_lateral = ConvNormAct(dims, stem_channels, c, 1, norm=norm, act=False)
        # depthwise-separable refinement at full resolution: sees the input skip and the coarse decoder together
        self.refine = nn.Sequential(ConvNormAct(dims, c, c, 3, groups=c, norm=norm),
                                    ConvNormAct(dims, c, c, 1, norm=norm))
        return c

    def _register_features(self, channels, full_res_channels: int) -> None:
        """Feature names, channels and strides, for the distillation losses."""
        self.feature_channels: Dict[str, int] = OrderedDict()
        self.feature_strides: Dict[str, int] = OrderedDict()
        if self.full_res is not None:
            self.feature_channels["enc0"], self.feature_strides["enc0"] = full_res_channels, 1
        for name, k, c in zip(self._enc_names, self.levels, channels):
            self.feature_channels[name], self.feature_strides[name] = c, 2 ** k
        for i in range(len(self.levels) - 2, -1, -1):
            k = self.levels[i]
            self.feature_channels[f"dec{k}"], self.feature_strides[f"dec{k}"] = channels[i], 2 ** k
        if self.full_res is not None:
            self.feature_channels["dec0"], self.feature_strides["dec0"] = full_res_channels, 1

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x (B, in_channels, *S) -> logits (B, out_channels, *S) [, OrderedDict of features]."""
        xp, size = pad_to_multiple(x, self.multiple)
        if self.spatial_dims == 2 and xp.device.type == "cpu":
            # oneDNN's depthwise and 1x1 convolutions are much faster on CPU in NHWC (measured 52 -> 32 ms on a
            # fundus image with 2 threads); every layer then keeps that layout
            xp = xp.contiguous(memory_format=torch.channels_last)
        # features are only kept when asked for: holding the decoder's maps would raise the peak memory in 3D
        feats: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        skip0 = self.full_res(xp) if self.full_res is not None else None
        if skip0 is not None and return_features:
            feats["enc0"] = skip0
        skips = []
        h = xp
        for name, stage in zip(self._enc_names, self.encoder):
            h = stage(h)
            skips.append(h)
            if return_features:
                feats[name] = h
        for j, (lateral, block) in enumerate(zip(self.laterals, self.decoder)):
            i = len(skips) - 2 - j
            skip, skips[i] = skips[i], None  # drop the list's reference: freed as soon as it is used
            # in-place add: the upsampled temporary is not needed again, one large allocation fewer
            h = block(upsample(lateral(h), skip.shape[2:], self.upsample_mode).add_(skip))
            del skip
            if return_features:
                feats[f"dec{self.levels[i]}"] = h
        if skip0 is not None:
            h = self.refine(upsample(self.full_res_lateral(h), skip0.shape[2:], self.upsample_mode).add_(skip0))
            del skip0
            if return_features:
                feats["dec0"] = h
            logits = self.head(h)
        else:
            logits = self.head(h)
            if self.levels[0] > 0:
                logits = upsample(logits, xp.shape[2:], self.upsample_mode)
        logits = crop_to(logits, size).contiguous()
        if not return_features:
            return logits
        feats = OrderedDict((n, crop_to(f, feature_size(size, self.feature_strides[n]))) for n, f in feats.items())
        return logits, feats
