"""Teacher: a residual U-Net (DynUNet/nnU-Net layout) assembled from MONAI's dynunet blocks, 2D and 3D.

Assembled from the blocks rather than wrapping ``monai.networks.nets.DynUNet`` because DynUNet keeps a second
reference to every stage (its recursive skip layers), which duplicates each weight in ``state_dict`` (and so in
the model file), and because walking the stages here yields the named features the distillation losses need.

Layout for ``filters=(f0, ..., fD)`` (strides in brackets; see ``common`` for the naming convention)::

    enc0 [1]  = ResBlock(in -> f0)                 dec0 [1]  = Up(dec1 -> f0, skip enc0) -> 1x1 -> logits
    enc1 [2]  = ResBlock(f0 -> f1, stride 2)       dec1 [2]  = Up(dec2 -> f1, skip enc1)
    ...                                             ...
    bottleneck [2**D] = ResBlock(f(D-1) -> fD, stride 2)

Each ResBlock is two 3x3 convolutions with InstanceNorm and LeakyReLU plus a residual path (MONAI UnetResBlock);
each Up is a transposed convolution, concatenation with the skip and two convolutions (MONAI UnetUpBlock).
InstanceNorm (nnU-Net's choice) because the teacher trains on small batches of large patches.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn

from KDSegmentationLib.models.blocks import crop_to, feature_size, pad_to_multiple


class TeacherUNet(nn.Module):
    """Residual U-Net teacher.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels and classes (logits, background included).
        filters: channels per level from full resolution to the bottleneck; ``len(filters) - 1`` halvings, so
            inputs are padded to a multiple of ``2 ** (len(filters) - 1)``.
        norm: MONAI norm name ('instance', 'batch', ...).
        dropout: optional dropout rate inside the blocks.

    ``forward(x)`` -> logits (B, out_channels, *x.shape[2:]) for any input size;
    ``forward(x, return_features=True)`` -> (logits, OrderedDict name -> (B, feature_channels[name], *ceil(S/stride))).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 filters: Sequence[int] = (32, 64, 128, 256, 320), norm: Union[str, Tuple] = "instance",
                 dropout: float = 0.0):
        super().__init__()
        # MONAI imported here, not at module scope, so that importing the networks package (student inference)
        # does not pay MONAI's import time
        from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        filters = [int(f) for f in filters]
        if len(filters) < 2:
            raise ValueError("filters needs at least two levels")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = len(filters) - 1
        self.multiple = 2 ** self.depth
        drop = dropout or None

        self.encoder = nn.ModuleList()
        for k, f in enumerate(filters):
            cin = in_channels if k == 0 else filters[k - 1]
            self.encoder.append(UnetResBlock(spatial_dims, cin, f, kernel_size=3, stride=1 if k == 0 else 2,
                                             norm_name=norm, dropout=drop))
        self.decoder = nn.ModuleList()
        for k in range(self.depth - 1, -1, -1):
            self.decoder.append(UnetUpBlock(spatial_dims, filters[k + 1], filters[k], kernel_size=3, stride=1,
                                            upsample_kernel_size=2, norm_name=norm, dropout=drop))
        self.head = UnetOutBlock(spatial_dims, filters[0], out_channels)

        self._enc_names = [f"enc{k}" for k in range(self.depth)] + ["bottleneck"]
        self.feature_channels: Dict[str, int] = OrderedDict()
        self.feature_strides: Dict[str, int] = OrderedDict()
        for k, (name, f) in enumerate(zip(self._enc_names, filters)):
            self.feature_channels[name], self.feature_strides[name] = f, 2 ** k
        for k in range(self.depth - 1, -1, -1):
            self.feature_channels[f"dec{k}"], self.feature_strides[f"dec{k}"] = filters[k], 2 ** k

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """x (B, in_channels, *S) -> logits (B, out_channels, *S) [, OrderedDict of features]."""
        xp, size = pad_to_multiple(x, self.multiple)
        feats: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        skips = []
        h = xp
        for name, block in zip(self._enc_names, self.encoder):
            h = block(h)
            skips.append(h)
            if return_features:
                feats[name] = h
        for j, up in enumerate(self.decoder):
            k = self.depth - 1 - j
            h = up(h, skips[k])
            skips[k] = None  # used: let it be freed (peak memory of whole-volume 3D inference)
            if return_features:
                feats[f"dec{k}"] = h
        logits = crop_to(self.head(h), size)
        if not return_features:
            return logits
        feats = OrderedDict((n, crop_to(f, feature_size(size, self.feature_strides[n]))) for n, f in feats.items())
        return logits, feats
