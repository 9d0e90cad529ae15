"""No option is silently ignored, every misspelt one names the valid choices.

A new user's checks of the entry points: ``wt.make_masks`` / ``apply_masks`` keywords, and
settings the training run would never read (``f_solver`` under ``grad="unroll"``, which only
iterates plainly; ``--no-augment`` on ``synthetic``, which has no augmentation; a DEQ core's
``mask_schedule`` outside ``--pretrain-steps``, the only place it unrolls by the schedule).
"""

import pytest
import torch

import wtmodels as wt
from wtmodels.cells import ConvCell
from wtmodels.masks import apply_masks
from wtmodels.model_config import ModelConfig, fields_without_effect
from wtmodels.train_config import TrainConfig, settings_without_effect


@pytest.mark.parametrize("call", [
    lambda: wt.make_masks((8, 8), k=2, density=0.5, kinds="nm"),
    lambda: apply_masks(ConvCell(8), k=2, density=0.5, shedule="block"),
])
def test_a_misspelt_mask_keyword_is_a_value_error_naming_the_valid_ones(call):
    # both raised Python's TypeError ("unexpected keyword argument"), naming no valid keyword
    with pytest.raises(ValueError, match=r"valid: .*'density'.*'kind'"):
        call()


def test_f_solver_under_grad_unroll_has_no_effect_and_is_refused_by_the_run():
    # grad="unroll" iterates plainly with autograd (implicit.DEQ._unroll): the forward solver is
    # never called. Measured here: broyden and anderson give the same output, bit for bit.
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    x = torch.randn(3, 6)
    f = lambda z: 0.3 * torch.tanh(lin(z)) + x  # noqa: E731
    outs = [wt.DEQ(f_solver=s, grad="unroll", f_max_iter=7)(f, torch.zeros(3, 6))[0]
            for s in ("anderson", "broyden")]
    assert torch.equal(outs[0], outs[1])
    assert "f_solver" in fields_without_effect(ModelConfig(core="deq", grad="unroll"))
    assert "f_solver" not in fields_without_effect(ModelConfig(core="deq", grad="phantom"))
    found = settings_without_effect(TrainConfig(
        model="deq_s", model_overrides={"grad": "unroll", "f_solver": "broyden"}))
    assert set(found) == {"f_solver"}


def test_no_augment_on_synthetic_is_refused_by_the_run():
    # the synthetic dataset has no augmentation (README Data table: "none"): the flag was read
    # by nothing and accepted
    found = settings_without_effect(TrainConfig(model="wt_s", dataset="synthetic", augment=False))
    assert set(found) == {"augment"}
    assert settings_without_effect(TrainConfig(model="wt_s", augment=False)) == {}  # digits


def test_deq_depth_is_read_only_in_pretrain():
    # README Models table: a DEQ core's depth is its unroll depth in pretrain mode; the solve
    # runs f_max_iter iterations whatever the depth. `--model deq_s --depth 12` was accepted
    # and trained the same model as depth 6
    x = torch.randn(2, 1, 8, 8)
    outs = []
    for depth in (2, 5):
        torch.manual_seed(0)
        model = wt.create_model("test_deq", in_chans=1, depth=depth).eval()
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    found = settings_without_effect(TrainConfig(model="deq_s", model_overrides={"depth": 12}))
    assert set(found) == {"depth"}
    assert settings_without_effect(TrainConfig(model="deq_s", model_overrides={"depth": 12},
                                               pretrain_steps=10)) == {}
    assert settings_without_effect(TrainConfig(model="deq_s", model_overrides={"depth": 6})) == {}


def test_deq_mask_schedule_is_read_only_in_pretrain():
    # the DEQ core solves the K-periodic composite (README Masks: "schedule not used"); only
    # its pretrain unroll follows the schedule
    x = torch.randn(2, 1, 8, 8)
    outs = {}
    for schedule in ("cyclic", "block"):  # depth 4, K 2: masks 0101 against 0011 when unrolled
        torch.manual_seed(0)
        model = wt.create_model("test_deq", in_chans=1, depth=4, mask_k=2,
                                mask_schedule=schedule).eval()
        with torch.no_grad():
            solved = model(x)
            model.set_pretrain(True)
            outs[schedule] = (solved, model(x))
    assert torch.equal(outs["cyclic"][0], outs["block"][0])
    assert not torch.allclose(outs["cyclic"][1], outs["block"][1])
    over = {"mask_k": 2, "mask_schedule": "block"}
    found = settings_without_effect(TrainConfig(model="deq_s", model_overrides=over))
    assert set(found) == {"mask_schedule"}
    assert settings_without_effect(TrainConfig(model="deq_s", model_overrides=over,
                                               pretrain_steps=10)) == {}
    assert settings_without_effect(TrainConfig(model="wt_s", model_overrides=over)) == {}
