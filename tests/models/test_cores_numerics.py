"""Acceptance checks of the four cores against hand computations, in float64.

What each core computes is rebuilt here from the cell's parts (convolutions with the weight times
the mask a schedule names, the cell's norms), independent of the cores' own code paths.
"""

import pytest
import torch
import torch.nn.functional as F
from torchdiffeq import odeint

import wtmodels as wt
from wtmodels.masks import mask_index, set_mask_index
from wtmodels.models import model_summary

X = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def hand_cell(cell, z, x, index):
    """The cell's formula with mask ``index`` (None: dense) applied to both convolutions."""
    w1, w2 = cell.conv1.weight, cell.conv2.weight
    if index is not None:
        w1, w2 = w1 * cell.conv1.weight_masks[index], w2 * cell.conv2.weight_masks[index]
    y = F.relu(cell.norm1(F.conv2d(z, w1, padding=1)))
    y = cell.norm2(F.conv2d(y, w2, padding=1))
    return cell.norm3(F.relu(z + x + y))


@pytest.mark.parametrize("core", ["unrolled", "untied", "ode"])
@pytest.mark.parametrize("schedule", ["cyclic", "block"])
@pytest.mark.parametrize("depth, k", [(5, 2), (3, 5), (4, 1), (7, 3)])
def test_cores_apply_the_cell_with_the_scheduled_mask(core, schedule, depth, k):
    # K != D, K > D (block: some masks unused), K = 1; ODE: Euler steps of 1 are the iteration
    torch.manual_seed(0)
    model = wt.create_model(f"test_{'wt' if core == 'unrolled' else core}", in_chans=1,
                            depth=depth, mask_k=k, mask_schedule=schedule,
                            ode_method="euler", ode_T=float(depth)).double()
    used = []
    for layer in model.cores[0].modules():
        if hasattr(layer, "weight_masks"):
            layer.register_forward_pre_hook(lambda mod, _: used.append(mod.mask_index))
    out = model(X)
    expected = [mask_index(t, depth, k, schedule) for t in range(depth)]
    assert used[0::2] == expected and used[1::2] == expected  # conv1, conv2 of each step
    x = model.stem(X)
    z = torch.zeros_like(x)
    for t in range(depth):
        cell = model.cores[0].cells[t] if core == "untied" else model.cores[0].cell
        z = hand_cell(cell, z, x, expected[t])
    ref = model.head(F.adaptive_avg_pool2d(z, 1).flatten(1))
    assert torch.allclose(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["test_wt", "test_untied", "test_ode", "test_deq"])
def test_effective_weights_hold_exactly_the_mask_nonzeros(name):
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, depth=4, mask_k=3, mask_density=0.3).double()
    seen = []
    for layer in model.cores[0].modules():
        if hasattr(layer, "weight_masks"):
            layer.register_forward_pre_hook(
                lambda mod, _: seen.append((mod.masked_weight() != 0).equal(
                    mod.weight_masks[mod.mask_index])))
    with torch.no_grad():
        model(X)
    assert seen and all(seen)


@pytest.mark.parametrize("name, overrides", [
    ("test_wt", {"mask_k": 2}), ("test_untied", {"mask_k": 2}), ("test_ode", {"mask_k": 2}),
    ("test_ode", {"ode_method": "dopri5"}), ("test_deq", {"mask_k": 2}),
    ("test_deq", {"f_solver": "broyden"}), ("test_deq", {"grad": "unroll"}),
])
def test_no_core_mixes_samples(name, overrides):
    # GroupNorm is per sample and the DEQ solvers stop per sample: a batch gives each sample's
    # own output (adaptive ODE steps are shared by the batch: equal within the tolerance)
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, **overrides).double().eval()
    x = torch.randn(5, 1, 7, 7, dtype=torch.float64)
    x[0] *= 10  # one sample far from the others
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(5)])
        channels_last = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last))
    atol = 3e-3 if overrides.get("ode_method") == "dopri5" else 1e-12
    assert torch.allclose(batched, single, rtol=0, atol=atol)
    assert torch.allclose(batched, channels_last, rtol=0, atol=1e-12)


def test_ode_core_is_torchdiffeq_on_the_cell():
    torch.manual_seed(0)
    model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5", ode_rtol=1e-5,
                            ode_atol=1e-5, depth=3, ode_T=2.0).double()
    core = model.cores[0]
    x = model.stem(X).detach()
    ref = odeint(lambda t, z: core.cell(z, x) - z, torch.zeros_like(x),
                 torch.tensor([0.0, 2.0], dtype=torch.float64), method="dopri5", rtol=1e-5,
                 atol=1e-5, options={"norm": wt.ode.per_sample_rms_norm})[-1]
    assert torch.equal(core(x), ref)


def test_summary_matches_hand_counts():
    # test_wt: width 8, 1 input channel, 10 classes, 3x3 convs; GroupNorm: 2 params / channel
    stem, cell, head = 1 * 8 * 9 + 16, 2 * 8 * 8 * 9 + 3 * 16, 8 * 10 + 10
    conv_flops = 2 * 8 * 8 * 9 * 64  # one 8->8 conv on an 8x8 image (2 per multiply-add)
    stem_flops, head_flops = 2 * 1 * 8 * 9 * 64, 2 * 8 * 10
    untied = model_summary(wt.create_model("test_untied", in_chans=1, depth=3, mask_k=2,
                                           mask_density=0.5), (1, 8, 8))
    assert untied == {
        "params": stem + 3 * cell + head,
        "nonzero_params_per_iter": stem + cell - 2 * 288 + head,  # 288 of 576 per conv kept
        "cell_evals": 3.0,
        "flops_per_image": stem_flops + 3 * 2 * conv_flops + head_flops,
    }
    rk4 = model_summary(wt.create_model("test_ode", in_chans=1, depth=2), (1, 8, 8))
    assert rk4["cell_evals"] == 8 and rk4["params"] == stem + cell + head
    assert rk4["flops_per_image"] == stem_flops + 8 * 2 * conv_flops + head_flops


@pytest.mark.parametrize("name", ["test_wt", "test_untied", "test_ode", "test_deq"])
def test_state_dict_round_trip_reproduces_outputs_bit_for_bit(name):
    overrides = dict(in_chans=1, mask_k=2, spectral_norm=True, dropout=0.2)
    torch.manual_seed(1)
    trained = wt.create_model(name, **overrides).double()
    trained(X).square().sum().backward()
    torch.optim.SGD(trained.parameters(), lr=0.1).step()  # weights away from their init
    loaded = wt.create_model(name, **{**overrides, "mask_seed": 5}).double()  # other masks
    loaded.load_state_dict(trained.state_dict())
    for mode in ("eval", "train"):  # train: dropout draws and a spectral-norm power step
        outputs = []
        for model in (trained, loaded):
            getattr(model, mode)()
            torch.manual_seed(3)
            outputs.append(model(X))
        assert torch.equal(*outputs), mode


def test_deq_output_is_the_fixed_point_of_the_masked_composite_per_stage():
    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, stages=2, mask_k=3, f_max_iter=60,
                            f_tol=1e-9).double().eval()
    inputs, outputs = [], []
    for core in model.cores:
        core.register_forward_hook(lambda mod, args, out: inputs.append(args[0]) or
                                   outputs.append(out) or None)
    with torch.no_grad():
        model(X)
        for core, x, z in zip(model.cores, inputs, outputs):
            fz = z
            for i in range(3):  # f_2 o f_1 o f_0
                set_mask_index(core.cell, i)
                fz = core.cell(fz, x)
            residual = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
            assert core.last_stats["converged"] == 1.0
            assert residual.max() <= 1e-9
