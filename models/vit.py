"""ViT_P / ViT_C in PyTorch: the two stems, pre-LN encoder and the paper-era initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ConvStem, PatchifyStem, ViTConfig


class PatchifyStemModule(nn.Module):
    """One stride-p pxp conv: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, stem: PatchifyStem, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=stem.patch, stride=stem.patch)
        fan_in = in_chans * stem.patch**2
        nn.init.normal_(self.proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, H*W, D)


class ConvStemModule(nn.Module):
    """Stacked 3x3 conv-BN-ReLU, then a 1x1 conv with bias: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, stem: ConvStem, in_chans: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for layer in stem.layers[:-1]:
            layers += [
                nn.Conv2d(cin, layer.width, layer.kernel, layer.stride, padding=layer.kernel // 2, bias=False),
                nn.BatchNorm2d(layer.width, eps=1e-5, momentum=0.1),
                nn.ReLU(inplace=True),
            ]
            cin = layer.width
        last = nn.Conv2d(cin, dim, kernel_size=1, stride=1, bias=True)
        # The 3x3 convs keep the framework default init (paper-era); the 1x1 follows pycls.
        nn.init.normal_(last.weight, std=math.sqrt(2.0 / dim))
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, H*W, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # (B, heads, N, hd) -> (B, N, D)


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block, no dropout or drop-path."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubically resize a (1, 1 + g*g, D) position embedding to (1, 1 + new_grid^2, D); class slot kept."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = math.isqrt(grid_pos.shape[1])
    if old_grid**2 != grid_pos.shape[1]:
        raise ValueError(f"position embedding has {grid_pos.shape[1]} grid tokens, not a square")
    if old_grid == new_grid:
        return pos_embed
    d = grid_pos.shape[-1]
    # (1, g*g, D) -> (1, D, g, g) for spatial interpolation
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT with a patchify (ViT_P) or convolutional (ViT_C) stem."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stem_cls = ConvStemModule if isinstance(cfg.stem, ConvStem) else PatchifyStemModule
        self.stem = stem_cls(cfg.stem, cfg.in_chans, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final-normed class token (B, D)."""
        self._check_size(x)
        x = self.stem(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        x = self.blocks(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images -> (B, classes) logits."""
        return self.head(self.forward_features(x))

    def _check_size(self, x: torch.Tensor) -> None:
        """Refuse an input of another H x W than the model's by name (the position embedding fits one size; past the
        stem the mismatch is an opaque token count). Python on static shapes: no op in a traced or compiled graph."""
        size = self.cfg.image_size
        if x.ndim == 4 and tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"input is {x.shape[-2]}x{x.shape[-1]} (HxW), but {self.cfg.name} takes {size}x{size}: "
                             "preprocess to its image_size")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Weights trained at another resolution load with their position embedding resized.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resize_pos_embed(state_dict[key], self.cfg.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
