"""A forward pass cut short by Ctrl-C, and the CapaBoost experiment's
Fashion-MNIST lookup."""

import pytest
import torch

import wtmodels as wt
from benchmarks import capaboost
from wtmodels import data
from wtmodels.peft import add_lora


def _model(seed=0):
    torch.manual_seed(seed)
    model = wt.create_model("test_wt", num_classes=3, in_chans=1)
    layers = add_lora(model, rank=2, copies=2, density=0.5, train_head=True)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(std=0.1)
    return model, layers


def _interrupt(model, x, grad):
    """Ctrl-C inside the model's forward pass (a KeyboardInterrupt is not an Exception: torch
    then skips the always_call forward hooks)."""
    def boom(module, args):
        raise KeyboardInterrupt

    handle = model.head.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt), torch.set_grad_enabled(grad):
        model(x)
    handle.remove()


def _train(model, x, steps):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(x).logsumexp(1).sum().backward()
        opt.step()


@pytest.mark.parametrize("grad", [False, True])
def test_training_after_an_interrupted_forward_pass_matches_an_uninterrupted_model(grad):
    # before: the interrupted pass's formed copies stayed and were reused: after an eval
    # (no-grad) pass the factors got no gradient at all, after a training pass the second step
    # raised "Trying to backward through the graph a second time"
    x = torch.randn(2, 1, 12, 12)
    model, layers = _model()
    twin, twin_layers = _model()
    _interrupt(model, x, grad)
    _train(model, x, steps=3)
    _train(twin, x, steps=3)
    for layer, ref in zip(layers, twin_layers):
        assert not torch.equal(ref.lora_A, ref.lora_A.new_zeros(ref.lora_A.shape))
        torch.testing.assert_close(layer.lora_A, ref.lora_A, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, ref.lora_B, rtol=0, atol=0)
    assert model._peft_formed_stack == []


def _idx_folder(path, names):
    path.mkdir()
    for name in names:
        (path / name).write_bytes(b"")
    return str(path)


def test_auto_dataset_finds_fashion_mnist_as_the_loader_does(tmp_path, monkeypatch):
    # the loader reads plain or gzipped idx files and needs both splits; "auto" looked for
    # train-images-idx3-ubyte.gz only
    plain = _idx_folder(tmp_path / "plain", [f"{s}-{k}" for s in ("train", "t10k")
                                             for k in ("images-idx3-ubyte", "labels-idx1-ubyte")])
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [plain])
    assert capaboost.resolve_dataset("auto") == "fashion_mnist"
    train_only = _idx_folder(tmp_path / "train_only", ["train-images-idx3-ubyte.gz",
                                                       "train-labels-idx1-ubyte.gz"])
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [train_only])
    assert capaboost.resolve_dataset("auto") == "digits"


def test_missing_fashion_mnist_exits_2_before_any_folder(tmp_path, monkeypatch, capsys):
    # before: the runs started, created the folders, then failed with "pass --data-dir DIR or
    # --download", options this command does not have
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "absent")])
    out = tmp_path / "out"
    assert capaboost.main(["--out", str(out), "--smoke", "--dataset", "fashion_mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-dir" not in err
    assert "valid datasets: auto, fashion_mnist, digits" in err
    assert not out.exists()


def test_the_lora_base_class_built_directly_names_the_classes_to_use():
    # before: "LoRALayer wraps an Conv2d, got Linear" for a Linear (and a Conv2d was accepted,
    # then failed at the first forward pass with NotImplementedError)
    from torch import nn

    from wtmodels.peft import LoRALayer

    for layer in (nn.Linear(3, 3), nn.Conv2d(3, 3, 1)):
        with pytest.raises(ValueError, match="LoRALinear or LoRAConv2d.*LoRALayer.wrap"):
            LoRALayer(layer, rank=1)


def test_no_match_lists_only_layers_that_can_still_be_wrapped():
    # before: after add_lora the candidates were "0.base, 2.base", names that select nothing
    from torch import nn

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Conv2d(1, 1, 1))
    add_lora(net, rank=1, targets=nn.Linear)
    with pytest.raises(ValueError, match=r"candidate layers: 3; already wrapped: 0, 2$"):
        add_lora(net, rank=1, targets=nn.Linear)
