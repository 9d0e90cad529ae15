"""The digits data without scikit-learn at run time: the CSV reader equals ``load_digits``, the
written-out split equals scikit-learn's ``train_test_split``, and a digits run imports neither
scikit-learn nor torchdiffeq / scipy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wtmodels import data
from wtmodels.digits_split import TEST_INDICES, TRAIN_INDICES


def test_reader_equals_load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = data.load_digits_arrays()
    assert images.dtype == digits.images.dtype and np.array_equal(images, digits.images)
    assert np.array_equal(targets, digits.target)


def test_reader_falls_back_to_load_digits_where_the_csv_is_not(monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    images, targets = data.load_digits_arrays()
    assert np.array_equal(images, load_digits().images)
    assert np.array_equal(targets, load_digits().target)


def test_split_is_scikit_learns_stratified_split_in_its_order():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(np.arange(len(target)), test_size=data.DIGITS_TEST_FRACTION,
                                   stratify=target, random_state=data.DIGITS_SPLIT_SEED)
    assert list(TRAIN_INDICES) == train.tolist()  # the order too: it is the datasets' order
    assert list(TEST_INDICES) == test.tolist()
    # stratified: every class's share of the test set within one image of 20 %
    for label in range(10):
        in_test = int((target[list(TEST_INDICES)] == label).sum())
        assert abs(in_test - 0.2 * (target == label).sum()) <= 1


@pytest.mark.parametrize("augment", [False, True])
def test_datasets_hold_the_split_images_and_labels(augment):
    images, targets = data.load_digits_arrays()
    train, test, _ = data.get_datasets("digits", augment=augment)
    for ds, indices in ((train, TRAIN_INDICES), (test, TEST_INDICES)):
        assert len(ds) == len(indices)
        pixels = ds.images[:, 0].numpy() * 16  # (N, 8, 8), the stored images in 0..16
        assert np.array_equal(pixels, images[list(indices)].astype(np.float32))
        assert ds.targets.tolist() == targets[list(indices)].tolist()


def test_a_digits_run_imports_no_scikit_learn_torchdiffeq_or_scipy(tmp_path):
    code = (
        "import sys\n"
        "from wtmodels.train import main\n"
        "status = main(['--model', 'test_wt', '--dataset', 'digits', '--train-size', '64',\n"
        "               '--test-size', '32', '--batch-size', '32', '--epochs', '1',\n"
        f"               '--out', {str(tmp_path / 'run')!r}, '--progress', 'none'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'torchdiffeq', 'scipy',"
        " 'torchvision'}))\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_the_default_ode_method_is_one_validation_need_not_import_torchdiffeq_for():
    # ModelConfig.validate skips importing torchdiffeq only for the default ode_method
    from wtmodels.model_config import ModelConfig
    from wtmodels.ode import ODE_METHODS

    assert ModelConfig.ode_method in ODE_METHODS
    with pytest.raises(ValueError, match="unknown ode_method 'rk45'; valid methods: dopri8"):
        ModelConfig(core="unrolled", ode_method="rk45").validate()
