"""Acceptance checks of models and masks as a new user would try them: odd shapes, float64,
batch size 1, bad mask arguments refused before a model is built."""

import io

import numpy as np
import pytest
import torch

import wtmodels as wt
from wtmodels.masks import apply_masks, mask_index, set_mask_index
from wtmodels.models import get_config

FAMILIES = ["test_wt", "test_deq", "test_ode", "test_untied"]


@pytest.mark.parametrize("name", FAMILIES)
def test_float64_batch_one_non_square_rgb_with_masks(name):
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=3, num_classes=4, stages=2, mask_k=3,
                            mask_kind="nm").double()
    x = torch.randn(1, 3, 5, 11, dtype=torch.float64)
    logits = model(x)
    assert logits.shape == (1, 4) and logits.dtype == torch.float64
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())
    # the same masks after a save / load into a model built with another mask seed
    other = wt.create_model(name, in_chans=3, num_classes=4, stages=2, mask_k=3,
                            mask_kind="nm", mask_seed=9).double()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
        assert model(torch.randn(2, 3, 1, 1, dtype=torch.float64)).shape == (2, 4)


@pytest.mark.parametrize("overrides, message", [
    (dict(mask_kind="nm", mask_density=0.3), "n=1.2"),         # no n:4 pattern
    (dict(mask_kind="nm", width=6, norm_groups=2), "multiple of m"),  # 6*9 not a multiple of 4
    (dict(mask_density=1e-4), "rounds to 0 ones"),              # 576 weights x 1e-4
    (dict(width=1, norm="none", mask_k=10, mask_density=1 / 9), "fewer than k=10"),
])
def test_config_refuses_masks_the_cells_cannot_hold(overrides, message):
    # refused by the config (what `benchmarks.run --dry-run` and the CLI check first), naming
    # the mask fields, not only when the masks are drawn at build time
    overrides = {"mask_k": 2, **overrides}
    with pytest.raises(ValueError, match="mask_density") as err:
        get_config("test_wt", **overrides)
    assert message in str(err.value)


def test_config_accepts_masks_the_cells_can_hold():
    assert get_config("test_wt", mask_k=4, mask_kind="nm", mask_density=0.75).mask_k == 4
    assert get_config("test_wt", width=1, norm="none", mask_k=9, mask_density=1 / 9).mask_k == 9
    assert get_config("test_wt", mask_k=3, mask_kind="nm", mask_density=1.0).mask_k == 3


def test_make_masks_nm_takes_numpy_integers_and_float32_densities():
    a = wt.make_masks((4, 20), k=2, density=0.5, kind="nm", n=np.int64(2), m=np.int64(4))
    b = wt.make_masks((4, 20), k=2, density=0.5, kind="nm", n=2, m=4)
    assert torch.equal(a, b)
    masks = wt.make_masks((2, 10), k=2, density=np.float32(0.1), kind="nm", m=10)  # 1:10
    assert masks.sum().item() == 4


def test_make_masks_seed_out_of_range_names_the_range():
    assert wt.make_masks((3, 3), k=2, seed=2**64 - 1).shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 and < 2\*\*64"):
        wt.make_masks((3, 3), k=2, seed=2**64)


@pytest.mark.parametrize("args, field", [
    ((0, 0, 2, "block"), "depth"), ((0, 4, 0), "k"), ((-1, 4, 2), "t"), ((1.5, 4, 2), "t"),
])
def test_mask_index_bad_arguments_are_value_errors(args, field):
    with pytest.raises(ValueError, match=field):
        mask_index(*args)


def test_set_mask_index_refuses_a_non_integer():
    conv = apply_masks(torch.nn.Conv2d(2, 2, 1), k=3)
    with pytest.raises(ValueError, match="integer"):
        set_mask_index(conv, 1.5)


def test_settings_a_model_never_reads_are_refused_not_ignored():
    from wtmodels.model_config import ModelConfig, fields_without_effect
    from wtmodels.train_config import TrainConfig, settings_without_effect

    # ode_s integrates with rk4 (fixed steps): tolerances are never read
    found = settings_without_effect(TrainConfig(model="ode_s",
                                                model_overrides={"ode_rtol": 1e-5}))
    assert list(found) == ["ode_rtol"] and "rk4" in found["ode_rtol"]
    assert settings_without_effect(TrainConfig(model="ode_m",  # dopri5 reads them
                                               model_overrides={"ode_rtol": 1e-5})) == {}
    # norm_groups only sizes GroupNorm
    found = settings_without_effect(TrainConfig(
        model="wt_s", model_overrides={"norm": "layer", "norm_groups": 4}))
    assert list(found) == ["norm_groups"]
    assert "norm_groups" not in fields_without_effect(ModelConfig(norm="group"))
    # phantom_steps only shapes the phantom gradient: with IFT it was silently ignored
    found = settings_without_effect(TrainConfig(model="deq_s",
                                                model_overrides={"phantom_steps": 3}))
    assert found == {"phantom_steps": "read only with grad 'phantom'"}
    assert settings_without_effect(TrainConfig(
        model="deq_s", model_overrides={"grad": "phantom", "phantom_steps": 3})) == {}


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 3, 8, 8), (8, 8)])
def test_images_of_the_wrong_shape_are_a_clear_error(shape):
    # an unbatched (C, H, W) image failed deep inside ("mat1 and mat2 shapes cannot be
    # multiplied" from the head, or a GroupNorm size error); wrong channels a conv error
    model = wt.create_model("test_wt", in_chans=1)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, H, W\)"):
        model(torch.randn(*shape))
