"""Models, masks, cores, ODE: checks a new user ran, against hand-computed answers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wtmodels as wt


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


def _by_hand(cell, indices, x):
    """The cell applied with masks ``indices`` in turn, written out from the README formula."""
    z = torch.zeros_like(x)
    for i in indices:
        w1 = cell.conv1.weight * cell.conv1.weight_masks[i]
        w2 = cell.conv2.weight * cell.conv2.weight_masks[i]
        y = F.relu(cell.norm1(F.conv2d(z, w1, padding=1)))
        y = cell.norm2(F.conv2d(y, w2, padding=1))
        z = cell.norm3(F.relu(z + x + y))
    return z


@pytest.mark.parametrize("schedule, depth, k, indices", [
    ("cyclic", 5, 3, [0, 1, 2, 0, 1]),
    ("block", 6, 3, [0, 0, 1, 1, 2, 2]),
    ("block", 5, 2, [0, 0, 0, 1, 1]),
])
def test_mask_schedule_by_hand_in_every_core(schedule, depth, k, indices):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    kw = dict(depth=depth, mask_k=k, mask_schedule=schedule)
    tied = wt.create_model("test_wt", **kw).double().cores[0]
    want = _by_hand(tied.cell, indices, x)
    assert torch.equal(tied(x), want)
    ode = wt.create_model("test_ode", ode_method="euler", ode_T=float(depth), **kw).double()
    ode = ode.cores[0]
    ode.cell.load_state_dict(tied.cell.state_dict())
    torch.testing.assert_close(ode(x), want, rtol=0, atol=1e-12)
    untied = wt.create_model("test_untied", **kw).double().cores[0]
    for cell in untied.cells:
        cell.load_state_dict(tied.cell.state_dict())
    assert torch.equal(untied(x), want)
    # the DEQ composite f_{K-1} o ... o f_0, one solver step from z0 = 0 (schedule unused)
    deq = wt.create_model("test_deq", f_solver="fixed_point", f_max_iter=1, f_tol=1e-30,
                          **kw).double().eval().cores[0]
    deq.cell.load_state_dict(tied.cell.state_dict())
    with torch.no_grad():
        assert torch.equal(deq(x), _by_hand(tied.cell, list(range(k)), x))


def test_deepcopy_and_pickle_after_a_jac_reg_training_step():
    # DEQCore kept the last forward's Jacobian regulariser (a tensor with an autograd graph):
    # copy.deepcopy(model) after a training step with jac_reg raised RuntimeError
    import copy
    import io

    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, mask_k=2)
    model.set_jac_reg(True)
    x = torch.randn(2, 1, 6, 6)
    loss = model(x).logsumexp(1).mean() + 0.1 * model.jac_loss()
    loss.backward()
    assert model.jac_loss().grad_fn is not None  # the original keeps it for its own loss
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert other.cores[0].jac_loss() is None  # no forward ran on the copy
        assert float(other.jac_loss()) == 0.0
        for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_masked_plain_subclass_pickles():
    # apply_masks takes subclasses of conv / linear; their masked class is made on demand, and
    # pickle.dumps / torch.save(model) raised "Can't pickle <class 'wtmodels.masks.Masked...'>:
    # attribute lookup ... failed" (the built-in MaskedConv2d etc. pickled)
    import io
    import pickle

    from torch import nn
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    from wtmodels.masks import apply_masks, set_mask_index

    torch.manual_seed(0)
    layer = apply_masks(NonDynamicallyQuantizableLinear(8, 4), k=3, density=0.25,
                        types=nn.Linear)
    set_mask_index(layer, 2)
    x = torch.randn(5, 8)
    want = x @ (layer.weight * layer.weight_masks[2]).T + layer.bias  # mask 2 by hand
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        copy = pickle.loads(pickle.dumps(layer, protocol=protocol))
        assert type(copy) is type(layer)
        assert isinstance(copy, NonDynamicallyQuantizableLinear)
        assert copy.mask_index == 2 and torch.equal(copy.weight_masks, layer.weight_masks)
        torch.testing.assert_close(copy(x), want)
    buf = io.BytesIO()
    torch.save(nn.Sequential(layer), buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), want)
