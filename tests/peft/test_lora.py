"""Tests of LoRA / CapaBoost-LoRA: rank, parameter parity, factorisation, merge, masks, grads,
errors that name the layer and the factor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.masks import apply_masks
from wtmodels.peft import (
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    add_adapters,
    add_lora,
    count_trainable,
    merge_lora,
    peft_layers,
    unmerge_lora,
)


def _randomise(layers, seed=0):
    """Give every LoRA factor random values (B starts at zero, which hides the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).to(dtype)


@pytest.mark.parametrize("copies", [1, 2, 4, 8])
def test_rank_of_update_grows_with_copies_linear(copies):
    base = nn.Linear(48, 40).double()  # float64: no rounding noise counted as rank
    layer = LoRALayer.wrap(base, rank=3, copies=copies, density=0.5, seed=1)
    _randomise([layer])
    rank = torch.linalg.matrix_rank(layer.delta_weight().detach()).item()
    assert rank == min(3 * copies, 40)


@pytest.mark.parametrize("copies", [1, 2, 4])
def test_rank_of_update_grows_with_copies_conv(copies):
    base = nn.Conv2d(8, 16, 3).double()
    layer = LoRALayer.wrap(base, rank=2, copies=copies, density=0.5, seed=2)
    _randomise([layer])
    delta = layer.delta_weight().detach().flatten(1)  # (16, 72)
    assert torch.linalg.matrix_rank(delta).item() == 2 * copies


def test_unmasked_copies_do_not_raise_rank():
    # at density 1 the copies are identical: d * BA, rank r and d times the plain update
    plain = LoRALayer.wrap(nn.Linear(20, 20).double(), rank=2)
    copied = LoRALayer.wrap(nn.Linear(20, 20).double(), rank=2, copies=4, density=1.0)
    _randomise([plain]), _randomise([copied])
    assert torch.linalg.matrix_rank(copied.delta_weight().detach()).item() == 2
    torch.testing.assert_close(copied.delta_weight(), 4 * plain.delta_weight())


def test_delta_weight_is_the_sum_of_masked_copies():
    layer = LoRALayer.wrap(nn.Linear(10, 6), rank=3, copies=3, density=0.4, alpha=6.0, seed=5)
    _randomise([layer])
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    expected = sum((layer.mask_B[i] * b) @ (layer.mask_A[i] * a) for i in range(3))
    torch.testing.assert_close(layer.delta_weight().detach(), 2.0 * expected)  # alpha/rank = 2


def test_masks_exact_count_distinct_and_seeded():
    layer = LoRALayer.wrap(nn.Conv2d(4, 6, 3), rank=4, copies=4, density=0.5, seed=3)
    assert layer.mask_A.dtype == torch.bool and layer.mask_A.shape == (4, 4, 4, 3, 3)
    assert layer.mask_B.shape == (4, 6, 4)
    assert layer.mask_A.flatten(1).sum(1).tolist() == [72] * 4
    assert layer.mask_B.flatten(1).sum(1).tolist() == [12] * 4
    assert len({tuple(m.flatten().tolist()) for m in layer.mask_A}) == 4
    again = LoRALayer.wrap(nn.Conv2d(4, 6, 3), rank=4, copies=4, density=0.5, seed=3)
    other = LoRALayer.wrap(nn.Conv2d(4, 6, 3), rank=4, copies=4, density=0.5, seed=4)
    assert torch.equal(layer.mask_A, again.mask_A) and torch.equal(layer.mask_B, again.mask_B)
    assert not torch.equal(layer.mask_A, other.mask_A)


def test_plain_lora_stores_no_masks():
    layer = LoRALayer.wrap(nn.Linear(4, 4), rank=2)
    assert layer.mask_A is None and "mask_A" not in layer.state_dict()


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 2), (2, 0, 1)])
def test_conv_factorisation_equals_delta_weight_as_conv(stride, padding, dilation):
    base = nn.Conv2d(5, 7, 3, stride=stride, padding=padding, dilation=dilation).double()
    layer = LoRALayer.wrap(
        base, rank=2, copies=3, density=0.5, alpha=3.0, seed=0, impl="factorized"
    )
    _randomise([layer])
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    update = layer(x) - base(x)
    expected = F.conv2d(x, layer.delta_weight(), None, stride, padding, dilation)
    torch.testing.assert_close(update, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make_base", [
    lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1),
    lambda: nn.Linear(6, 5),
    lambda: apply_masks(nn.Conv2d(5, 7, 3, padding=1), k=3, density=0.5),
])
def test_dense_and_factorized_paths_agree_in_values_and_gradients(make_base):
    torch.manual_seed(0)
    base = make_base().double()
    dense = LoRALayer.wrap(base, rank=2, copies=4, density=0.5, seed=3, impl="dense")
    fact = LoRALayer.wrap(base, rank=2, copies=4, density=0.5, seed=3, impl="factorized")
    _randomise([dense]), _randomise([fact])
    if hasattr(base, "mask_index"):
        base.mask_index = 2  # the mask cuts the base weight, never the update
    shape = (3, 6) if isinstance(base, nn.Linear) else (2, 5, 6, 6)
    x = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for layer in (dense, fact):
        out = layer(x)
        out.square().sum().backward()
        grads.append((out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for d, f in zip(*grads):
        torch.testing.assert_close(d, f, rtol=1e-10, atol=1e-10)
    # and both equal the base output plus the update applied as one weight
    if isinstance(base, nn.Conv2d):
        delta = F.conv2d(x, dense.delta_weight(), None, base.stride, base.padding)
    else:
        delta = x @ dense.delta_weight().T
    torch.testing.assert_close(grads[0][0], base(x).detach() + delta.detach())


def test_auto_impl_picks_dense_for_wide_updates():
    wide = LoRALayer.wrap(nn.Conv2d(64, 64, 3), rank=4, copies=4, density=0.5)
    thin = LoRALayer.wrap(nn.Conv2d(64, 64, 3), rank=2)
    assert (wide.impl, thin.impl) == ("dense", "factorized")  # 16*640/36864 > 0.1 > 2*640/..


def test_linear_update_equals_delta_weight_on_any_leading_dims():
    base = nn.Linear(6, 4).double()
    layer = LoRALayer.wrap(base, rank=2, copies=2, density=0.5)
    _randomise([layer])
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x) - base(x), x @ layer.delta_weight().T)


def test_gradcheck_through_masked_copies():
    layer = LoRALayer.wrap(nn.Conv2d(2, 3, 3, padding=1).double(), rank=2, copies=3, density=0.5)
    _randomise([layer])
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    def f(a, b):
        return torch.func.functional_call(layer, {"lora_A": a, "lora_B": b}, (x,))

    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (a, b), fast_mode=True)


def test_add_lora_wraps_targets_and_starts_equal_to_base():
    net = _net()
    x = torch.randn(4, 3, 8, 8)
    before = net(x)
    layers = add_lora(net, rank=2, copies=2, density=0.5)
    assert [type(m).__name__ for m in layers] == ["LoRAConv2d", "LoRAConv2d"]
    assert isinstance(net[0], LoRAConv2d) and isinstance(net[6], nn.Linear)
    torch.testing.assert_close(net(x), before)  # B = 0 at init
    assert peft_layers(net) == layers


def test_targets_by_type_and_name_pattern():
    net = _net()
    layers = add_lora(net, rank=1, targets=[nn.Linear, "2"])
    assert isinstance(net[2], LoRAConv2d) and isinstance(net[6], LoRALinear)
    assert not isinstance(net[0], LoRALayer) and len(layers) == 2
    # a pattern on an enclosing module selects every layer inside it
    outer = nn.Sequential()
    outer.add_module("body", _net())
    outer.add_module("tail", nn.Linear(5, 2))
    assert len(add_lora(outer, rank=1, targets="body")) == 3
    assert not isinstance(outer.tail, LoRALayer)


@pytest.mark.parametrize("copies,density", [(1, 1.0), (2, 0.5), (4, 0.5), (4, 0.25), (8, 0.9)])
def test_trainable_parameters_do_not_depend_on_copies_or_density(copies, density):
    net = _net()
    add_lora(net, rank=3, copies=copies, density=density, train_head=False)
    # conv 3->8 k3: A 3*3*9 + B 8*3 ; conv 8->8 k3: A 3*8*9 + B 8*3
    assert count_trainable(net) == (81 + 24) + (216 + 24)
    net = _net()
    add_lora(net, rank=3, copies=copies, density=density, train_head="6")
    assert count_trainable(net) == (81 + 24) + (216 + 24) + (8 * 5 + 5)


def test_gradients_reach_lora_factors_and_head_only():
    net = _net()
    layers = add_lora(net, rank=2, copies=4, density=0.5, train_head="6")
    _randomise(layers)
    net(torch.randn(4, 3, 8, 8)).square().sum().backward()
    trainable = {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    trainable |= {id(p) for p in net[6].parameters()}
    for name, p in net.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merge_equals_unmerged_and_unmerge_restores():
    net = _net(torch.float64)
    layers = add_lora(net, rank=2, copies=4, density=0.5, targets=[nn.Conv2d, nn.Linear])
    _randomise(layers)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    original = [m.base.weight.detach().clone() for m in layers]
    unmerged = net(x)
    assert merge_lora(net) == 3
    assert all(m.merged for m in layers)
    torch.testing.assert_close(net(x), unmerged, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(net)
    with pytest.raises(RuntimeError, match="already merged"):
        layers[0].merge()
    assert unmerge_lora(net) == 3
    for m, w in zip(layers, original):
        torch.testing.assert_close(m.base.weight, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layers[0].unmerge()


def test_merged_flag_and_masks_survive_state_dict():
    net = _net()
    layers = add_lora(net, rank=2, copies=2, density=0.5, seed=7)
    _randomise(layers)
    merge_lora(net)
    state = net.state_dict()
    assert state["0.mask_A"].dtype == torch.bool and state["0.mask_B"].shape == (2, 8, 2)
    fresh = _net()
    add_lora(fresh, rank=2, copies=2, density=0.5, seed=99)  # other masks until loaded
    assert not torch.equal(fresh[0].mask_A, layers[0].mask_A)
    fresh.load_state_dict(state)
    assert torch.equal(fresh[0].mask_A, layers[0].mask_A) and fresh[0].merged
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x))
    unmerge_lora(fresh), unmerge_lora(net)
    torch.testing.assert_close(fresh(x), net(x))


def test_merge_into_weight_norm_is_exact_and_other_cases_refused():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3).double())
    net = nn.Sequential(conv)
    layers = add_lora(net, rank=2, copies=2, density=0.5)
    _randomise(layers)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before, weight = net(x), conv.weight.detach().clone()
    merge_lora(net)
    torch.testing.assert_close(net(x), before)
    torch.testing.assert_close(conv.weight, weight + layers[0].delta_weight())
    unmerge_lora(net)
    torch.testing.assert_close(conv.weight, weight)

    net = nn.Sequential(apply_masks(nn.Conv2d(2, 2, 3), k=2))
    add_lora(net, rank=1)
    with pytest.raises(ValueError, match="static masks"):
        merge_lora(net)
    # spectral norm has no exact right inverse: refused, and the earlier layer is unmerged
    plain = nn.Conv2d(2, 2, 3, padding=1)
    net = nn.Sequential(plain, torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 2, 3)))
    layers = add_lora(net, rank=1)
    _randomise(layers)
    weight = plain.weight.detach().clone()
    with pytest.raises(ValueError, match="no exact right inverse"):
        merge_lora(net)
    assert not any(m.merged for m in layers)
    torch.testing.assert_close(plain.weight, weight)


def test_shared_layer_is_wrapped_once():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    layers = add_lora(net, rank=1, targets=nn.Linear)
    assert len(layers) == 1 and net[0] is net[2] is layers[0]


def test_masked_copies_formed_once_per_forward_of_a_weight_tied_model(monkeypatch):
    model = wt.create_model("test_wt", num_classes=3, in_chans=1, depth=4, mask_k=2)
    layers = add_lora(model, rank=2, copies=2, density=0.5, targets="cores", train_head=True)
    assert len(layers) == 2  # the cell's two convs, applied 4 times each
    _randomise(layers)
    calls = []
    original = LoRALayer.form

    def counting_form(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(LoRALayer, "form", counting_form)
    x = torch.randn(2, 1, 8, 8)
    out = model(x)
    assert len(calls) == 2 and all(m._formed is None for m in layers)
    # the same values as forming on the fly at every call (no model-level hooks)
    cell = model.cores[0].cell
    z = torch.zeros(2, 8, 8, 8)
    feats = model.stem(x)
    for t in range(4):
        wt.masks.set_mask_index(cell, t % 2)
        z = cell(z, feats)
    torch.testing.assert_close(out, model.head(z.mean((2, 3))))
    assert len(calls) == 2 + 2 * 4


def test_fine_tuning_a_weight_tied_model_learns():
    torch.manual_seed(0)
    model = wt.create_model("test_wt", num_classes=2, in_chans=1)
    add_lora(model, rank=2, copies=2, density=0.5, train_head=True)
    x = torch.randn(32, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    assert (model(x).argmax(1) == y).float().mean() >= 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=1.5), "rank"),
        (dict(rank=2, copies=0), "copies"),
        (dict(rank=2, density=0.0), "density"),
        (dict(rank=2, density=1.5), r"density must be in \(0, 1\]"),
        (dict(rank=2, kind="gaussian"), "valid kinds: random, bernoulli, nm"),
        (dict(rank=2, alpha=-1.0), "alpha"),
        (dict(rank=2, impl="fast"), "valid impls: auto, factorized, dense"),
        (dict(rank=2, targets="nothing_here"), "no module matched"),
        (dict(rank=2, targets=[nn.ReLU]), "Conv2d, Linear"),
        (dict(rank=2, targets=[]), "targets is empty"),
        (dict(rank=2, train_head="classifier"), "no module named 'classifier'"),
        (dict(rank=3, density=0.5, kind="nm"), "N:M"),
        (dict(rank=2, seed=-1), "seed must be an integer >= 0"),
        (dict(rank=2, seed=1.5), "seed must be an integer >= 0"),
        (dict(rank=2, targets=[nn.Conv2d, "haed"]), r"pattern\(s\) \['haed'\] match no layer"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_alone(kwargs, match):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        add_lora(net, **kwargs)
    assert not peft_layers(net) and all(p.requires_grad for p in net.parameters())
    assert net.state_dict().keys() == before.keys()


def test_grouped_conv_and_model_itself_rejected():
    with pytest.raises(ValueError, match="grouped"):
        add_lora(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), rank=1)
    with pytest.raises(ValueError, match="model itself"):
        add_lora(nn.Linear(3, 3), rank=1, targets=nn.Linear)


def test_capaboost_masks_follow_the_weights_into_channels_last():
    net = _net()
    layers = add_lora(net, rank=2, copies=2, density=0.5)
    _randomise(layers)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = net(x)
        net.to(memory_format=torch.channels_last)
        got = net(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layers[0].mask_A[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["dense", "factorized"])
def test_forward_hooks_on_the_base_run_on_every_path(impl):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda module, args, out: out.relu())  # changes the output
    net = nn.Sequential(conv)
    (layer,) = add_lora(net, rank=2, copies=2, density=0.5, impl=impl)
    _randomise([layer])
    x = torch.randn(2, 3, 6, 6)
    a_cat, b_cat = layer.concatenated()
    expected = conv(x) + layer._update(x, a_cat, b_cat)  # the hook runs on the base output
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="forward hooks"):
        merge_lora(net)


def test_merge_refuses_custom_forwards_and_shared_weights():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(Doubled(2, 2, 3))
    add_lora(net, rank=1)
    with pytest.raises(ValueError, match="not the plain"):
        merge_lora(net)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    add_lora(net, rank=1, targets=nn.Linear)
    with pytest.raises(ValueError, match="share a base weight"):
        merge_lora(net)
    assert not any(m.merged for m in peft_layers(net))
    # tied to a layer without LoRA: the merge would change that layer too
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    add_lora(net, rank=1, targets=["0"])
    before = b.weight.detach().clone()
    with pytest.raises(ValueError, match="tied to a layer without LoRA"):
        merge_lora(net)
    assert not any(m.merged for m in peft_layers(net))
    torch.testing.assert_close(b.weight.detach(), before, rtol=0, atol=0)


def test_unmerge_subtracts_what_was_merged_even_after_a_step():
    net = _net()
    layers = add_lora(net, rank=2, copies=2, density=0.5)
    _randomise(layers)
    weights = [m.base.weight.detach().clone() for m in layers]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    net(torch.randn(2, 3, 9, 9)).sum().backward()
    opt.step()  # momentum now holds a velocity
    merge_lora(net)
    opt.step()  # the factors move while merged
    unmerge_lora(net)
    for m, w in zip(layers, weights, strict=True):
        torch.testing.assert_close(m.base.weight, w)


def test_weight_norm_merge_in_bfloat16():
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    net = nn.Sequential(conv)
    layers = add_lora(net, rank=2)
    _randomise(layers)
    net.to(torch.bfloat16)
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    before = net(x)
    merge_lora(net)
    torch.testing.assert_close(net(x), before, rtol=5e-2, atol=5e-2)


def test_layer_classes_validate_their_arguments():
    import numpy as np

    with pytest.raises(ValueError, match="rank"):
        LoRAConv2d(nn.Conv2d(3, 4, 3), rank=0)
    with pytest.raises(ValueError, match="grouped"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=1)
    with pytest.raises(ValueError, match="wraps an Linear"):
        LoRALinear(nn.Conv2d(3, 4, 3), rank=1)
    layer = LoRALayer.wrap(nn.Linear(6, 4), rank=np.int64(2), copies=np.int64(2),
                           density=np.float32(0.5), seed=np.int64(3))
    assert layer.rank == 2 and layer.copies == 2


def test_attention_out_projection_is_skipped():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    layers = add_lora(block, rank=2, targets=nn.Linear)
    assert {type(m.base) for m in layers} == {nn.Linear}  # linear1, linear2
    assert len(layers) == 2
    assert block(torch.randn(3, 5, 8)).shape == (3, 5, 8)


def test_peft_errors_name_the_layer_and_factor():
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"layer '1' \(Conv2d\): LoRA on a grouped"):
        add_lora(net, rank=1)
    model = wt.create_model("test_wt", in_chans=1)
    with pytest.raises(ValueError, match=r"layer 'stem.0' \(Conv2d\): masks of lora_A"):
        add_lora(model, rank=4, copies=2, density=0.5, kind="nm")
    with pytest.raises(ValueError, match=r"layer 'cores.0.cell.conv1' .*masks of lora_B"):
        add_lora(model, rank=3, copies=2, density=0.5, kind="nm", targets="cores")
    with pytest.raises(ValueError, match=r"layer '0' .*masks of adapter_up"):
        add_adapters(nn.Sequential(nn.Linear(3, 4)), bottleneck=3, copies=2, density=0.5,
                     kind="nm", targets=nn.Linear)
    with pytest.raises(ValueError, match="targets must be layer types"):
        add_lora(net, rank=1, targets=3)
    assert not any(type(m).__name__.startswith("LoRA") for m in model.modules())
