"""Analytic flops (multiply-adds), parameters and activations, pycls-style.

Two bookkeepings: "paper" (default) reproduces the published table — MLP terms over the spatial tokens only,
patchify bias not counted, position-embedding add counted — and "released" follows the later reference code
(all tokens everywhere, patchify bias counted, position-embedding add not counted). The one published number the
paper bookkeeping misses is ViT_C-36GF flops: 34.92 GF computed vs 35.0 printed, an apparent rounding slip.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ConvStem, ViTConfig

BOOKKEEPINGS = ("paper", "released")


@dataclass(frozen=True)
class Complexity:
    """Totals for one model at its image size and class count."""

    flops: int
    params: int
    acts: int


def _stem(cfg: ViTConfig, bookkeeping: str) -> Complexity:
    flops = params = acts = 0
    size, cin = cfg.image_size, cfg.in_chans
    if isinstance(cfg.stem, ConvStem):
        for i, layer in enumerate(cfg.stem.layers):
            size = (size + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
            out = layer.width * size * size
            weights = layer.kernel**2 * cin * layer.width
            flops += weights * size * size
            params += weights
            acts += out
            if i == len(cfg.stem.layers) - 1:  # 1x1 with bias, no BN
                flops += out
                params += layer.width
            else:  # BN: gamma and beta
                params += 2 * layer.width
            cin = layer.width
    else:
        p, g = cfg.patch_size, cfg.grid
        weights = p * p * cin * cfg.dim
        flops += weights * g * g + (cfg.dim * g * g if bookkeeping == "released" else 0)
        params += weights + cfg.dim
        acts += cfg.dim * g * g
    return Complexity(flops, params, acts)


def _linear(cin: int, cout: int, n: int) -> tuple[int, int, int]:
    """(flops, params, acts) of a biased linear over n tokens."""
    return cin * cout * n + cout * n, cin * cout + cout, cout * n


def complexity(cfg: ViTConfig, bookkeeping: str = "paper") -> Complexity:
    """Flops (multiply-adds), params and activations of a variant under the chosen bookkeeping."""
    if not isinstance(cfg, ViTConfig):  # a name failed with "'str' object has no attribute 'dim'"
        raise TypeError(f"complexity takes a models.ViTConfig (models.get_config(name)), got {type(cfg).__name__}")
    if bookkeeping not in BOOKKEEPINGS:
        raise ValueError(f"unknown bookkeeping {bookkeeping!r}; expected one of {BOOKKEEPINGS}")
    d, n = cfg.dim, cfg.num_tokens
    n_mlp = n - 1 if bookkeeping == "paper" else n
    stem = _stem(cfg, bookkeeping)
    flops, params, acts = stem.flops, stem.params, stem.acts
    params += d + n * d  # class token, position embedding
    if bookkeeping == "paper":  # the position-embedding add
        flops += n * d
        acts += n * d

    block = [_linear(d, 3 * d, n), _linear(d, d, n), _linear(d, cfg.mlp_dim, n_mlp), _linear(cfg.mlp_dim, d, n_mlp)]
    b_flops = sum(x[0] for x in block) + 2 * n * n * d  # + q.k^T and attn.v
    b_params = sum(x[1] for x in block) + 2 * 2 * d  # + two LayerNorms
    b_acts = sum(x[2] for x in block) + cfg.heads * n * n + n * d  # + attention map and attn.v
    flops += cfg.depth * b_flops
    params += cfg.depth * b_params
    acts += cfg.depth * b_acts

    params += 2 * d  # final LayerNorm
    h_flops, h_params, h_acts = _linear(d, cfg.num_classes, 1)
    return Complexity(flops + h_flops, params + h_params, acts + h_acts)
