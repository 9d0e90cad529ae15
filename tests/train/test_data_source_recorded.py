"""The data source a run read is recorded: ``get_datasets``' ``info["source"]`` for each idx
layout, and ``config.json``'s ``data_info`` of a training run. A run that read Fashion-MNIST from
the system copy (no ``--data-dir``) recorded ``data_dir: null`` and nothing else, so its run
directory did not say which files it trained on; ``info["source"]`` (``config.json``'s
``data_info``) now names the folder the idx files were read from."""

from __future__ import annotations

import json

from tests.data.test_data_loading import _write_mnist_folder
from wtmodels import data
from wtmodels.data import get_datasets
from wtmodels.train import run


def test_idx_source_is_the_folder_read(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _write_mnist_folder(system, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(system)])
    assert get_datasets("fashion_mnist")[2]["source"] == str(system)
    plain = tmp_path / "plain"
    _write_mnist_folder(plain, gz=False)
    assert get_datasets("mnist", data_dir=plain)[2]["source"] == str(plain)
    layout = tmp_path / "tv" / "MNIST" / "raw"  # torchvision's own layout, uncompressed
    _write_mnist_folder(layout, gz=False)
    monkeypatch.chdir(tmp_path)
    assert get_datasets("mnist", data_dir="tv")[2]["source"] == str(layout)  # absolute


def test_run_directory_records_the_data_source(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _write_mnist_folder(system, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(system)])
    out = tmp_path / "run"
    run({"model": "test_wt", "dataset": "fashion_mnist", "epochs": 1, "batch_size": 10,
         "out": str(out), "device": "cpu"})
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["data_dir"] is None
    assert config["data_info"]["source"] == str(system)
