"""Batch norm over the global batch of all processes (the student's, under DDP)."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as du


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients (as SyncBatchNorm's)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch of all processes, for any backend (gloo included).

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this is the same computation written with
    an autograd-aware all-reduce of the per-channel sum, sum of squares and count. Also stands in
    for timm's BatchNormAct2d (its ``drop`` and ``act`` are applied after the norm). Outside
    training, or without a process group, it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d (and timm BatchNormAct2d) in ``module``, keeping weights and names."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            if module.momentum is None or not module.affine or not module.track_running_stats:
                raise ValueError("GlobalBatchNorm2d converts affine batch norms with running stats and a momentum")
            new = cls(module.num_features, module.eps, module.momentum)
            new.drop = getattr(module, "drop", nn.Identity())
            new.act = getattr(module, "act", nn.Identity())
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new.to(module.weight.device)
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and du.is_distributed()):
            return self.act(self.drop(super().forward(x)))
        channels = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, dtype=xf.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        y = (xf - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]
        return self.act(self.drop(y.to(x.dtype)))


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: native SyncBatchNorm on GPU, GlobalBatchNorm2d on CPU."""
    if device.type == "cuda":
        from timm.layers import (
            convert_sync_batchnorm,  # keeps timm's fused norm+activation layers
        )

        return convert_sync_batchnorm(net)
    return GlobalBatchNorm2d.convert(net)
