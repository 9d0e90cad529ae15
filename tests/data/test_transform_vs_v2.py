"""TensorImageTransform against its torchvision v2 oracle on the inputs v2 accepts beyond a
float32 (C, H, W) image: half / bfloat16 and leading batch dims (they crashed inside
F.interpolate), and a non-float or 2-D input is a ValueError naming what it takes."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from wtmodels.data import TensorImageTransform

MEAN, STD = (0.3053,), (0.3760,)


def _both(image, size, crop_pad):
    ours = TensorImageTransform(MEAN, STD, size, crop_pad=crop_pad)
    steps = [v2.Resize((size, size), antialias=True)]
    if crop_pad:
        steps.append(v2.RandomCrop(size, padding=crop_pad))
    theirs = v2.Compose([*steps, v2.Normalize(mean=list(MEAN), std=list(STD))])
    torch.manual_seed(7)
    expected = theirs(image.clone())
    after_theirs = torch.randint(0, 10**9, ())
    torch.manual_seed(7)
    got = ours(image.clone())
    after_ours = torch.randint(0, 10**9, ())
    return got, expected, bool(after_ours == after_theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size, crop_pad", [(12, 0), (5, 1)])
def test_half_precision_images_match_torchvision(dtype, size, crop_pad):
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, expected, same_draws = _both(image, size, crop_pad)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected) and same_draws


@pytest.mark.parametrize("size, crop_pad", [(12, 1), (5, 0)])
def test_batched_images_match_torchvision(size, crop_pad):
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got, expected, same_draws = _both(images, size, crop_pad)
    assert got.shape == (4, 1, size, size)
    assert torch.equal(got, expected) and same_draws


@pytest.mark.parametrize("image", [torch.zeros(1, 8, 8, dtype=torch.uint8), torch.rand(8, 8)])
def test_non_float_or_2d_input_is_a_value_error(image):
    tf = TensorImageTransform(MEAN, STD, 12, crop_pad=1)
    with pytest.raises(ValueError, match=r"floating-point \(C, H, W\)"):
        tf(image)
