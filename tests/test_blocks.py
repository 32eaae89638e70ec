"""The core's ``vdvae`` residual block."""

from __future__ import annotations

import numpy as np
import pytest

from hvae_core.config import resolve_config
from hvae_core.plugins import get_registry


def make_block(**kwargs):
    cfg = resolve_config(overrides=kwargs.pop("overrides", []))
    factory = get_registry().get("block", "vdvae").load()
    return factory(cfg.options("block"), cfg.model, **kwargs)


def numpy(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def test_shapes_and_bottleneck_structure() -> None:
    block = make_block(in_width=16, middle_width=8, out_width=24, residual=False, name="b")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    assert numpy(block(x)).shape == (2, 8, 8, 24)
    assert [tuple(c.kernel.shape) for c in block.convs] == [
        (1, 1, 16, 8),
        (3, 3, 8, 8),
        (3, 3, 8, 8),
        (1, 1, 8, 24),
    ]


def test_kernel_size_one_at_small_resolutions() -> None:
    block = make_block(in_width=8, middle_width=4, out_width=8, kernel_size=1)
    block.build((None, 2, 2, 8))
    assert [c.kernel.shape[0] for c in block.convs] == [1, 1, 1, 1]


def test_zero_last_scale_makes_the_block_start_as_identity() -> None:
    x = np.random.default_rng(1).normal(size=(3, 4, 4, 8)).astype("float32")
    residual = make_block(in_width=8, middle_width=4, out_width=8, last_scale=0.0)
    np.testing.assert_array_equal(numpy(residual(x)), x)
    plain = make_block(in_width=8, middle_width=4, out_width=5, residual=False, last_scale=0.0)
    np.testing.assert_array_equal(numpy(plain(x)), np.zeros((3, 4, 4, 5), "float32"))


def test_last_layer_init_is_scaled_like_vdvae() -> None:
    # PyTorch's default: uniform with bound 1/sqrt(fan_in) (std 1/sqrt(3 fan_in)); the last
    # convolution is scaled by last_scale = 1/sqrt(depth).
    depth = 16
    block = make_block(in_width=256, middle_width=256, out_width=256, last_scale=depth**-0.5)
    block.build((None, 4, 4, 256))
    first, last = numpy(block.convs[0].kernel), numpy(block.convs[3].kernel)
    assert first.std() == pytest.approx(1 / np.sqrt(3 * 256), rel=0.03)
    assert np.abs(first).max() <= 1 / np.sqrt(256)
    assert last.std() == pytest.approx(depth**-0.5 / np.sqrt(3 * 256), rel=0.03)


def test_activation_and_group_norm_come_from_the_model_config() -> None:
    block = make_block(
        in_width=16,
        middle_width=8,
        out_width=16,
        overrides=["model.b_act=gelu", "model.block_gn=true"],
    )
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 16)).astype("float32")
    assert numpy(block(x)).shape == x.shape
    assert block.activation_name == "gelu" and len(block.norms) == 4
    assert block.norms[1].groups == 8


def test_residual_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="in_width == out_width"):
        make_block(in_width=8, middle_width=4, out_width=6)


def test_config_round_trip() -> None:
    from hvae_core.model.blocks import ResidualBlock

    block = make_block(in_width=8, middle_width=4, out_width=8, last_scale=0.5, name="rb")
    clone = ResidualBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()


def test_honours_the_dtype_policy() -> None:
    import keras

    from hvae_core.model.blocks import ResidualBlock

    block = ResidualBlock(8, 4, 8, dtype="mixed_bfloat16")
    out = block(np.ones((1, 4, 4, 8), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert all(c.compute_dtype == "bfloat16" and c.variable_dtype == "float32" for c in block.convs)
