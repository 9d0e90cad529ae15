"""Suite-wide test settings."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One intra-op thread for the whole suite.

    The tests run tiny tensors, where thread hand-offs cost more than they save, and on a busy
    2-core machine two threads per op made some tests 100x slower. Subprocess tests (CLI, DDP)
    are not affected: they start their own interpreter.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_killed_after_epoch(monkeypatch):
    """``kill(settings, epoch=1)``: train ``settings`` with ``wtmodels.train.run`` until the
    checkpoint of ``epoch`` is on disk, then stop it as a kill would (a KeyboardInterrupt right
    after that save), leaving the run directory for a ``--resume``.

    Example:
        >>> def test_resume(train_killed_after_epoch, tmp_path):  # doctest: +SKIP
        ...     train_killed_after_epoch({"model": "test_wt", "epochs": 2, "out": str(tmp_path)})
    """
    import wtmodels.train as train_mod

    def kill(settings: dict, epoch: int = 1) -> None:
        real_save = train_mod._Trainer._save

        def save_then_die(self, done):
            real_save(self, done)
            if done == epoch:
                raise KeyboardInterrupt("simulated kill")

        monkeypatch.setattr(train_mod._Trainer, "_save", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                train_mod.run(settings)
        finally:
            monkeypatch.setattr(train_mod._Trainer, "_save", real_save)
        # a killed process's generators die with it: reseed them, so a resume that did not
        # restore the checkpoint's RNG states cannot pass on the states left here
        random.seed(12345)
        np.random.seed(12345)  # noqa: NPY002 (the global state a checkpoint restores)
        torch.manual_seed(12345)

    return kill
