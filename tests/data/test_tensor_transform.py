"""The digits transform without torchvision: bit-equal to torchvision's v2 pipeline it replaces,
with the same random draws (tests/data/test_digits_split.py checks that a digits run imports no
torchvision)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.transforms import v2

from wtmodels.data import NORMALISATION, TensorImageTransform, get_datasets


def _torchvision_pipeline(mean, std, size, crop_pad, image_side):
    """The v2 pipeline digits used before (Resize only when the side changes)."""
    steps = []
    if image_side != size:
        steps.append(v2.Resize((size, size), antialias=True))
    if crop_pad > 0:
        steps.append(v2.RandomCrop(size, padding=crop_pad))
    steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("side, size", [(8, 8), (8, 12), (8, 5), (8, 16), (10, 3)])
@pytest.mark.parametrize("crop_pad", [0, 1, 2])
def test_bit_equal_to_torchvision_with_the_same_draws(channels, side, size, crop_pad):
    mean, std = (0.3, 0.5, 0.1)[:channels], (0.2, 0.7, 1.3)[:channels]
    ours = TensorImageTransform(mean, std, size, crop_pad=crop_pad)
    theirs = _torchvision_pipeline(mean, std, size, crop_pad, side)
    images = torch.rand(12, channels, side, side, generator=torch.Generator().manual_seed(1))
    offsets = set()
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        expected = theirs(image.clone())
        after_theirs = torch.randint(0, 10**9, ())  # the generator's next draw
        torch.manual_seed(seed)
        got = ours(image.clone())
        after_ours = torch.randint(0, 10**9, ())
        assert got.shape == (channels, size, size) and got.dtype == torch.float32
        assert torch.equal(got, expected), (seed, (got - expected).abs().max())
        assert after_ours == after_theirs  # the same number of draws from the global generator
        offsets.add(got.sum().item())
    if crop_pad:  # the crops really move: not one offset for every seed
        assert len(offsets) > 1


def test_digits_sets_are_the_torchvision_pipeline_on_the_raw_digits():
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    mean, std = NORMALISATION["digits"]
    for augment, image_size in ((True, None), (False, None), (True, 12), (False, 6)):
        train, test, info = get_datasets("digits", augment=augment, image_size=image_size)
        size = image_size or 8
        assert info["image_size"] == size
        for ds, pad in ((train, 1 if augment else 0), (test, 0)):
            pipeline = _torchvision_pipeline(mean, std, size, pad, 8)
            for index in (0, 7, len(ds) - 1):
                torch.manual_seed(100 + index)
                x, y = ds[index]
                # find the raw digit this item is (the split is a permutation of the 1797)
                source = ds.images[index]  # (1, 8, 8), before any transform
                matches = (raw == source[0]).flatten(1).all(1).nonzero()
                assert len(matches) >= 1
                torch.manual_seed(100 + index)
                assert torch.equal(x, pipeline(source.clone()))


def test_bad_settings_are_refused_and_the_transform_pickles():
    with pytest.raises(ValueError, match="std"):
        TensorImageTransform((0.5,), (0.0,), 8)
    for size in (0, 2.5, True):
        with pytest.raises(ValueError, match="size must be an integer >= 1"):
            TensorImageTransform((0.5,), (0.25,), size)
    with pytest.raises(ValueError, match="crop_pad must be an integer >= 0"):
        TensorImageTransform((0.5,), (0.25,), 8, crop_pad=-1)
    tf = TensorImageTransform((0.5,), (0.25,), 6, crop_pad=2)
    copy = pickle.loads(pickle.dumps(tf))  # loader workers started by spawn pickle it
    image = torch.rand(1, 8, 8)
    torch.manual_seed(3)
    a = tf(image)
    torch.manual_seed(3)
    assert torch.equal(copy(image), a)
    assert "crop_pad=2" in repr(tf)

