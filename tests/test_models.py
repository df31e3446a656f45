"""Model zoo: registry, invariants, forward passes, dynamic batch and position-embedding resize."""

from __future__ import annotations

import pytest
import torch

from models import (
    PAPER_VARIANTS,
    ConvLayer,
    ConvStem,
    PatchifyStem,
    ViTConfig,
    build_model,
    get_config,
    list_variants,
    register,
)
from models.config import conv_stem
from models.preprocessing import Preprocessing
from models.vit import VisionTransformer, resize_pos_embed

FAST = [n for n in list_variants() if not n.endswith(("18gf", "36gf", "72gf"))]
LARGE = [n for n in list_variants() if n.endswith(("18gf", "36gf", "72gf"))]


def test_registry_has_every_paper_variant_and_the_mini_pair():
    names = list_variants()
    for n in PAPER_VARIANTS + ("vit_p_mini", "vit_c_mini"):
        assert n in names


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="vit_c_1gf"):
        build_model("vit_q_1gf")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register(get_config("vit_c_1gf"))


@pytest.mark.parametrize("name", [n for n in list_variants() if n.startswith("vit_c")])
def test_conv_twin_has_one_block_fewer(name):
    c, p = get_config(name), get_config(name.replace("vit_c", "vit_p"))
    assert c.depth == p.depth - 1 and (c.dim, c.mlp_dim, c.heads) == (p.dim, p.mlp_dim, p.heads)


def test_paper_stem_shapes():
    c1 = get_config("vit_c_1gf").stem
    assert [(lyr.kernel, lyr.stride, lyr.width) for lyr in c1.layers] == [
        (3, 2, 24), (3, 2, 48), (3, 2, 96), (3, 2, 192), (1, 1, 192)]
    c18 = get_config("vit_c_18gf").stem
    assert [lyr.stride for lyr in c18.layers] == [2, 2, 1, 2, 1, 2, 1]
    assert [lyr.width for lyr in c18.layers] == [64, 128, 128, 256, 256, 512, 768]
    mini = get_config("vit_c_mini").stem
    assert [(lyr.kernel, lyr.stride) for lyr in mini.layers] == [(3, 2), (3, 2), (1, 1)]
    assert get_config("vit_p_1gf").stem == PatchifyStem(16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 190}, "divisible by heads"),
        ({"image_size": 100}, "multiple of patch_size"),
        ({"patch_size": 8}, "product of stem strides"),
        ({"depth": 0}, "positive integer"),
    ],
)
def test_invalid_configs_say_expected_vs_actual(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_config("vit_c_1gf", **kwargs)


# A config as small as a model can be: one block of width 4, two heads, 8x8 images, two classes.
SMALLEST = {"name": "edge", "stem": PatchifyStem(4), "depth": 1, "dim": 4, "mlp_dim": 4, "heads": 2, "patch_size": 4,
            "image_size": 8, "num_classes": 2}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_classes": 1}, "edge: num_classes must be at least 2, got 1: one class leaves nothing to classify"),
    ({"dim": 1, "heads": 1}, "edge: dim must be at least 2, got 1: LayerNorm over one feature outputs its bias"),
])
def test_configs_no_model_of_could_serve_are_refused(kwargs, match):
    # Export can never certify them (one logit ranks nothing; with dim 1 every image gets the same logits): they were
    # accepted up to export, after the training, which then wrote a bundle no server takes.
    with pytest.raises(ValueError, match=match):
        ViTConfig(**{**SMALLEST, **kwargs})


@pytest.mark.parametrize("in_chans", [1, 2, 4])
def test_in_chans_is_what_preprocessing_makes(in_chans):
    # A grey (or RGBA) model built and trained, then refused when its checkpoint was saved: preprocessing makes
    # 3 channels of every image, grey data included.
    assert Preprocessing.imagenet(8).channels == ViTConfig(**SMALLEST).in_chans == 3
    with pytest.raises(ValueError, match=f'edge: in_chans must be 3, got {in_chans}: .*grey data is read as mode "L" '
                                         "and replicated to 3"):
        ViTConfig(**{**SMALLEST, "in_chans": in_chans})
    with pytest.raises(ValueError, match=f"in_chans must be 3, got {in_chans}"):
        build_model("vit_c_mini", in_chans=in_chans)


@pytest.mark.parametrize("kwargs", [
    {"dim": 2, "heads": 2, "mlp_dim": 1},  # head size 1, a one-unit MLP
    {"stem": PatchifyStem(1), "patch_size": 1, "image_size": 1},  # patch 1, a single grid cell
    {"num_classes": 100_000},
])
def test_the_smallest_configs_that_serve_are_accepted(kwargs):
    cfg = ViTConfig(**{**SMALLEST, **kwargs})
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert logits.shape == (2, cfg.num_classes) and not torch.equal(logits[0], logits[1])  # each its own


def test_conv_stem_last_width_must_equal_dim():
    stem = conv_stem((3, 3, 1), (2, 2, 1), (16, 32, 48))
    with pytest.raises(ValueError, match="expected 32, got 48"):
        ViTConfig("bad", stem, 2, 32, 64, 2, patch_size=4, image_size=32)
    with pytest.raises(ValueError, match="1x1 stride 1"):
        ViTConfig("bad", ConvStem((ConvLayer(3, 2, 16), ConvLayer(3, 2, 32))), 2, 32, 64, 2,
                  patch_size=4, image_size=32)


def test_config_round_trips_through_dict():
    for name in list_variants():
        cfg = get_config(name)
        assert ViTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", FAST)
def test_forward_at_native_size(name):
    torch.manual_seed(0)
    cfg = get_config(name)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (2, cfg.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_forward_large_variants(name):
    cfg = get_config(name)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (1, cfg.num_classes)


@pytest.mark.parametrize("name", ["vit_c_mini", "vit_p_mini"])
def test_dynamic_batch_and_batch_invariance(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    for p in model.head.parameters():  # zero-init head would make every output trivially equal
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, singles, rtol=1e-4, atol=1e-5)


def test_head_is_zero_initialised_and_init_follows_paper():
    model = build_model("vit_c_1gf")
    assert model.head.weight.abs().sum() == 0 and model.cls_token.abs().sum() == 0
    assert 0.015 < model.pos_embed.std().item() < 0.025
    last = model.stem.body[-1]
    assert abs(last.weight.std().item() - (2 / 192) ** 0.5) < 0.01
    p = build_model("vit_p_1gf")
    assert abs(p.stem.proj.weight.std().item() - (1 / 768) ** 0.5) < 0.003
    assert model.blocks[0].mlp.fc1.bias.abs().max() < 1e-4
    assert model.norm.eps == 1e-6


def test_pos_embed_resize_keeps_class_slot_and_identity():
    pe = torch.randn(1, 1 + 8 * 8, 16)
    assert resize_pos_embed(pe, 8) is pe
    big = resize_pos_embed(pe, 12)
    assert big.shape == (1, 1 + 144, 16)
    torch.testing.assert_close(big[:, 0], pe[:, 0])
    # A constant field stays constant under interpolation.
    const = torch.ones(1, 65, 4)
    torch.testing.assert_close(resize_pos_embed(const, 4), torch.ones(1, 17, 4))


def test_state_dict_loads_into_other_image_size():
    torch.manual_seed(0)
    small = build_model("vit_c_mini").eval()
    big = build_model("vit_c_mini", image_size=48).eval()
    big.load_state_dict(small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 128)
    torch.testing.assert_close(big.pos_embed[:, 0], small.pos_embed[:, 0])
    with torch.no_grad():
        assert big(torch.randn(1, 3, 48, 48)).shape == (1, 10)
