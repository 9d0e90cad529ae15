"""Tests of the classifiers: every family, tied vs untied, masks, accounting, bad arguments."""

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import wtmodels as wt
from wtmodels.accounting import count_params
from wtmodels.models import ModelConfig, get_config, model_summary

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


TEST_VARIANTS = [name for name in wt.list_models() if name.startswith("test_")]


@pytest.mark.parametrize("mask_k", [0, 2])
@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_every_family_shape_finite_and_grads(name, mask_k):
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, num_classes=5, mask_k=mask_k)
    logits = model(X)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    stats = model.core_stats()
    assert stats["cell_evals"] >= 1


@pytest.mark.parametrize("name", [n for n in wt.list_models() if n not in TEST_VARIANTS])
def test_named_variants_build(name):
    model = wt.create_model(name, in_chans=1, num_classes=5)
    tiny = wt.create_model("test_" + name.split("_")[0], in_chans=1)
    assert count_params(model) > 10 * count_params(tiny)
    if name.endswith("_s"):
        with torch.no_grad():
            assert model.eval()(X[:1]).shape == (1, 5)


def test_every_family_registered():
    names = set(wt.list_models())
    for family in ("wt", "deq", "ode", "untied"):
        assert {f"{family}_s", f"{family}_m", f"test_{family}"} <= names


def test_any_input_size():
    model = wt.create_model("test_wt", in_chans=3, stages=2)
    for hw in [(5, 7), (16, 16), (32, 20)]:
        assert model(torch.randn(2, 3, *hw)).shape == (2, 10)


def _tied_and_untied(depth=3, **kw):
    torch.manual_seed(0)
    tied = wt.create_model("test_wt", in_chans=1, depth=depth, **kw).double()
    untied = wt.create_model("test_untied", in_chans=1, depth=depth, **kw).double()
    untied.stem.load_state_dict(tied.stem.state_dict())
    untied.head.load_state_dict(tied.head.state_dict())
    for cell in untied.cores[0].cells:
        cell.load_state_dict(tied.cores[0].cell.state_dict())
    return tied, untied


@pytest.mark.parametrize("mask_k", [0, 2])
def test_shared_weight_grad_is_sum_of_untied_copies_grads(mask_k):
    tied, untied = _tied_and_untied(depth=3, mask_k=mask_k, mask_density=0.5)
    x = X.double()
    y_tied, y_untied = tied(x), untied(x)
    assert torch.allclose(y_tied, y_untied, atol=1e-12)
    y_tied.square().sum().backward()
    y_untied.square().sum().backward()
    cells = untied.cores[0].cells
    for name, p in tied.cores[0].cell.named_parameters():
        summed = sum(dict(c.named_parameters())[name].grad for c in cells)
        assert torch.allclose(p.grad, summed, atol=1e-10), name
        # the copies see different inputs, so their grads differ from one another
        assert not torch.allclose(dict(cells[0].named_parameters())[name].grad,
                                  dict(cells[1].named_parameters())[name].grad)


def test_untied_masks_follow_the_tied_schedule():
    _, untied = _tied_and_untied(depth=3, mask_k=2, mask_schedule="cyclic")
    fresh = wt.create_model("test_untied", in_chans=1, depth=3, mask_k=2)
    for a, b in zip(fresh.cores[0].cells, untied.cores[0].cells):
        assert torch.equal(a.conv1.weight_masks, b.conv1.weight_masks)  # same masks per cell


def test_density_one_masks_change_nothing():
    torch.manual_seed(0)
    dense = wt.create_model("test_wt", in_chans=1, depth=3)
    torch.manual_seed(0)
    masked = wt.create_model("test_wt", in_chans=1, depth=3, mask_k=3, mask_density=1.0)
    assert torch.equal(dense(X), masked(X))


def test_masks_change_the_output_but_add_no_parameters():
    torch.manual_seed(0)
    dense = wt.create_model("test_wt", in_chans=1, depth=3)
    torch.manual_seed(0)
    masked = wt.create_model("test_wt", in_chans=1, depth=3, mask_k=3, mask_density=0.5)
    assert not torch.allclose(dense(X), masked(X))
    assert [n for n, _ in dense.named_parameters()] == [n for n, _ in masked.named_parameters()]
    assert model_summary(dense, (1, 8, 8))["params"] == model_summary(masked, (1, 8, 8))["params"]


def test_untied_holds_depth_cells_params():
    tied = model_summary(wt.create_model("test_wt", in_chans=1, depth=4), (1, 8, 8))
    untied = model_summary(wt.create_model("test_untied", in_chans=1, depth=4), (1, 8, 8))
    cell = sum(p.numel() for p in wt.create_model("test_wt", in_chans=1).cores[0].parameters())
    assert untied["params"] - tied["params"] == 3 * cell


def test_summary_known_answers():
    # test_wt on one 8x8 image: stem conv 1->8, two 8->8 3x3 convs per iteration, linear 8->10
    model = wt.create_model("test_wt", in_chans=1, depth=2, mask_k=2, mask_density=0.5)
    info = model_summary(model, (1, 8, 8))
    conv = lambda cin, cout: 2 * cin * cout * 9 * 64  # noqa: E731 - FLOPs of a 3x3 conv on 8x8
    assert info["flops_per_image"] == conv(1, 8) + 2 * 2 * conv(8, 8) + 2 * 8 * 10
    stem, cell, head = 72 + 16, 2 * 576 + 3 * 16, 8 * 10 + 10
    assert info["params"] == stem + cell + head
    assert info["nonzero_params_per_iter"] == stem + cell + head - 2 * 288  # half of each conv
    assert info["cell_evals"] == 2
    assert model.training  # mode restored


def test_summary_default_shape_follows_in_chans_and_ignores_the_jacobian_term():
    model = wt.create_model("test_deq", in_chans=1)  # a default of 3 channels crashed here
    plain = model_summary(model)
    model.set_jac_reg(True)  # the FLOP counter cannot follow the regulariser's autograd
    assert model_summary(model) == plain and model.cores[0].jac_reg
    assert plain["flops_per_image"] > 0


def test_masks_survive_save_and_load():
    a = wt.create_model("test_wt", in_chans=1, mask_k=3, mask_seed=1)
    b = wt.create_model("test_wt", in_chans=1, mask_k=3, mask_seed=2)
    masks = lambda m: m.cores[0].cell.conv1.weight_masks  # noqa: E731
    assert not torch.equal(masks(a), masks(b))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(masks(a), masks(b))
    assert torch.equal(a(X), b(X))


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_masked_models_go_channels_last(name):
    # the (K, out, in, kh, kw) mask stacks follow the weights into channels-last
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, num_classes=5, mask_k=2).eval()
    with torch.no_grad():
        want = model(X)
        model.to(memory_format=torch.channels_last)
        got = model(X.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    masks = next(b for n, b in model.named_buffers() if n.endswith("weight_masks"))
    assert masks[0].is_contiguous(memory_format=torch.channels_last)
    fresh = wt.create_model(name, in_chans=1, num_classes=5, mask_k=2)
    fresh.load_state_dict(model.state_dict())  # same keys, shapes and values
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers(), model.buffers(), strict=True))


def test_same_arguments_same_masks():
    a = wt.create_model("test_wt", in_chans=1, mask_k=3, mask_kind="nm")
    b = wt.create_model("test_wt", in_chans=1, mask_k=3, mask_kind="nm")
    assert torch.equal(a.cores[0].cell.conv2.weight_masks, b.cores[0].cell.conv2.weight_masks)


def test_unrolled_set_depth_equals_deeper_model():
    torch.manual_seed(0)
    model = wt.create_model("test_wt", in_chans=1, depth=2, mask_k=2)
    deeper = wt.create_model("test_wt", in_chans=1, depth=5, mask_k=2)
    deeper.load_state_dict(model.state_dict())
    model.set_depth(5)
    assert torch.equal(model(X), deeper(X))
    assert model.core_stats()["cell_evals"] == 5


def test_untied_set_depth_raises():
    with pytest.raises(ValueError, match="untied"):
        wt.create_model("test_untied", in_chans=1).set_depth(3)


def test_deq_stats_depth_and_pretrain():
    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, depth=3, f_max_iter=6, f_tol=1e-12)
    model(X)
    stats = model.core_stats()
    assert {"cell_evals", "nstep", "rel_residual", "rel_residual_max", "converged",
            "diverged"} <= set(stats)
    assert stats["nstep"] <= 6
    model.set_depth(2)
    model(X)
    assert model.core_stats()["nstep"] <= 2
    # pretrain = the unrolled weight-tied model with the same weights
    unrolled = wt.create_model("test_wt", in_chans=1, depth=3)
    unrolled.load_state_dict(model.state_dict())
    model.set_pretrain(True)
    assert torch.equal(model(X), unrolled(X))
    assert model.core_stats() == {"cell_evals": 3.0}


def test_jac_loss():
    model = wt.create_model("test_deq", in_chans=1)
    model(X)
    assert model.jac_loss().item() == 0.0
    model.set_jac_reg(True)
    model(X)
    loss = model.jac_loss()
    assert loss.dim() == 0 and loss.item() > 0 and loss.requires_grad
    plain = wt.create_model("test_wt", in_chans=1)
    plain.set_jac_reg(True)
    plain(X)
    assert plain.jac_loss().item() == 0.0


def test_variational_dropout_in_model():
    model = wt.create_model("test_wt", in_chans=1, dropout=0.3).train()
    torch.manual_seed(0)
    a = model(X)
    torch.manual_seed(0)
    assert torch.equal(model(X), a)  # the mask comes from the global (seeded) generator
    assert not torch.equal(model(X), a)
    model.eval()
    assert torch.equal(model(X), model(X))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depth=0), "depth"),
        (dict(width=0), "width"),
        (dict(mask_density=0.0), "mask_density"),
        (dict(mask_density=1.2), "mask_density"),
        (dict(mask_k=-1), "mask_k"),
        (dict(core="rnn"), "unrolled, deq, ode, untied"),
        (dict(mask_kind="gauss"), "random, bernoulli, nm"),
        (dict(mask_schedule="zigzag"), "cyclic, block"),
        (dict(norm="batch"), "group, layer, none"),
        (dict(width=12), "norm_groups"),
        (dict(core="deq", f_solver="newton"), "anderson"),
        (dict(core="ode", ode_method="leapfrog"), "dopri5"),
        (dict(f_solver="bogus"), "anderson"),  # checked even where the core does not use it
        (dict(b_solver="bogus"), "broyden"),
        (dict(ode_method="leapfrog"), "dopri5"),
        (dict(grad="magic"), "ift, phantom, unroll"),
        (dict(dropout=1.0), "dropout"),
        (dict(ode_T=0.0), "ode_T"),
        (dict(depht=3), "valid fields: num_classes"),
        (dict(weight_norm="yes"), "weight_norm"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        wt.create_model("wt_s", **overrides)


def test_unknown_model_lists_registered():
    with pytest.raises(ValueError, match="registered models: .*wt_s"):
        wt.create_model("wt_xl")


def test_nm_masks_need_a_divisible_input_dimension():
    with pytest.raises(ValueError, match="multiple of m"):
        wt.create_model("test_wt", in_chans=1, mask_k=2, mask_kind="nm", mask_density=0.5,
                        width=2, norm_groups=1)  # 2 * 9 = 18 inputs per output channel


def test_config_fields_are_simple():
    for field in ModelConfig.field_names():
        value = getattr(ModelConfig(), field)
        assert value is None or isinstance(value, (int, float, str, bool)), field
    cfg = get_config("wt_s", depth=9)
    assert cfg.depth == 9 and cfg.core == "unrolled"
    assert math.isclose(get_config("test_wt").mask_density, 0.5)


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):

        @wt.register_model
        def wt_s():
            return {}


def test_untied_cells_share_one_dropout_mask_per_forward():
    # one variational-dropout mask per sample per forward, as the tied cores' iterations share:
    # an untied model holding copies of the tied cell then computes what the tied model does
    tied, untied = _tied_and_untied(depth=3, mask_k=2, dropout=0.3)
    tied.train(), untied.train()
    torch.manual_seed(1)
    y_tied = tied(X.double())
    torch.manual_seed(1)
    y_untied = untied(X.double())
    assert torch.allclose(y_tied, y_untied, atol=1e-12)
    first, *rest = [cell.drop.mask for cell in untied.cores[0].cells]
    assert all(torch.equal(first, mask) for mask in rest)


def test_numpy_scalars_from_a_sweep_are_taken_as_python_numbers():
    import json

    import numpy as np

    from wtmodels.model_config import ModelConfig
    cfg = ModelConfig.from_dict({"depth": np.int64(3), "mask_k": np.arange(5)[2],
                                 "mask_density": np.float32(0.5), "weight_norm": np.bool_(True)})
    assert (cfg.depth, cfg.mask_k, cfg.mask_density, cfg.weight_norm) == (3, 2, 0.5, True)
    assert type(cfg.depth) is int and type(cfg.mask_density) is float
    json.dumps(dataclasses.asdict(cfg))  # numpy scalars would not serialise
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        ModelConfig.from_dict({"depth": np.float64(3.0)})


@pytest.mark.parametrize("name", ["test_wt", "test_deq", "test_ode"])
def test_set_depth_accepts_numpy_integers(name):
    # a depth-extrapolation sweep over np.arange: create_model(depth=np.int64(..)) was accepted
    # but set_depth(np.int64(3)) raised "depth must be an integer >= 1, got np.int64(3)"
    model = wt.create_model(name, in_chans=1, f_solver="fixed_point", f_tol=1e-30)
    model.set_depth(np.int64(3))
    with torch.no_grad():
        model(torch.randn(2, 1, 6, 5))
    stats = model.core_stats()
    if name == "test_wt":
        assert stats["cell_evals"] == 3.0  # 3 applications
    elif name == "test_ode":
        assert stats["nfe"] == 12.0  # rk4: 3 steps x 4 evaluations
    else:
        assert stats["nstep"] == 3.0  # solver budget 3, tolerance unreachable
    assert type(model.cores[0].depth if name != "test_deq" else model.cores[0].deq.f_max_iter) \
        is int
    for bad in (np.int64(0), 2.0, True):
        with pytest.raises(ValueError, match="depth must be an integer >= 1"):
            model.set_depth(bad)
