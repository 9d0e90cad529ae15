"""The PEFT API on models the other tests do not cover, against manual
computations (``W + scale * sum_i (M_B^i * B)(M_A^i * A)``, finite differences)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.peft import LoRALayer, add_adapters, add_lora, merge_lora, unmerge_lora


def manual_delta(layer: LoRALayer) -> torch.Tensor:
    """scale * sum over copies of (M_B^i * B) @ (M_A^i * A), by a plain loop."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    delta = torch.zeros(layer.weight_shape, dtype=a.dtype)
    for i in range(layer.copies):
        ai = a if layer.mask_A is None else a * layer.mask_A[i]
        bi = b if layer.mask_B is None else b * layer.mask_B[i]
        delta += (bi @ ai.flatten(1)).view(layer.weight_shape)
    return layer.scale * delta


CONV_KW = [dict(stride=2), dict(dilation=2, padding=2),
           dict(padding=1, padding_mode="reflect"),
           dict(padding=1, padding_mode="circular", bias=False),
           dict(padding="same", dilation=2)]


@pytest.mark.parametrize("impl", ["factorized", "dense"])
@pytest.mark.parametrize("kw", CONV_KW, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_conv_variants_equal_the_merged_weight_by_hand(kw, impl):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, **kw).double()
    ref = copy.deepcopy(conv)
    net = nn.Sequential(conv)
    (layer,) = add_lora(net, rank=2, copies=3, density=0.5, impl=impl, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        ref.weight += manual_delta(layer)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["wt_s", "untied_s", "deq_s", "ode_s"])
@pytest.mark.parametrize("mask_k", [0, 4])
def test_update_applies_at_every_iteration_of_the_cores(name, mask_k):
    # reference: the unwrapped model with a hook adding conv(x, dW) to each target conv, on
    # every one of its calls (D per pass in a weight-tied cell, masked weight or not)
    torch.manual_seed(0)
    model = wt.create_model(name, num_classes=3, in_chans=1, depth=3, width=8, stages=1,
                            norm_groups=4, mask_k=mask_k).double()
    ref = copy.deepcopy(model)
    layers = add_lora(model, rank=2, copies=2, density=0.5)
    refs, calls = dict(ref.named_modules()), {}
    for lname, layer in model.named_modules():
        if isinstance(layer, LoRALayer):
            nn.init.normal_(layer.lora_B, std=0.1)
            delta = manual_delta(layer)

            def hook(mod, args, out, d=delta, n=lname):
                calls[n] = calls.get(n, 0) + 1
                return out + mod._conv_forward(args[0], d, None)
            refs[lname].register_forward_hook(hook)
    assert len(layers) == (7 if name == "untied_s" else 3)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-12)
    if name in ("wt_s", "deq_s", "ode_s"):
        assert calls["cores.0.cell.conv1"] >= 3


def test_deq_ift_gradient_of_the_factors_matches_finite_differences():
    torch.manual_seed(0)
    model = wt.create_model("deq_s", num_classes=3, in_chans=1, depth=3, width=8, stages=1,
                            norm_groups=4, mask_k=4, f_solver="anderson", f_max_iter=200,
                            f_tol=1e-13, b_solver="anderson", b_max_iter=200, b_tol=1e-13,
                            grad="ift").double().eval()
    layers = add_lora(model, rank=2, copies=2, density=0.5, targets="cores")
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.05)
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2])

    def loss():
        return F.cross_entropy(model(x), t)

    loss().backward()
    for p, idx in ((layers[0].lora_B, (1, 1)), (layers[1].lora_A, (1, 2, 1, 1))):
        with torch.no_grad():
            p[idx] += 1e-6
            up = loss().item()
            p[idx] -= 2e-6
            down = loss().item()
            p[idx] += 1e-6
        fd = (up - down) / 2e-6
        assert abs(p.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (p.grad[idx], fd)


def test_adam_changes_only_factors_then_merge_loads_into_a_fresh_base_model():
    torch.manual_seed(0)
    base = wt.create_model("wt_s", num_classes=3, in_chans=1, depth=3, width=8, stages=1,
                           norm_groups=4, weight_norm=True)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=2, copies=2, density=0.5, train_head=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for k, v in after.items():
        if "lora_" not in k and "mask_" not in k and not k.endswith("_extra_state"):
            # bit-identical base; the head trains
            assert torch.equal(v, before[k.replace(".base.", ".")]) != k.startswith("head."), k
    model.eval()
    y = model(x)
    merge_lora(model)
    plain = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
             if "lora_" not in k and "mask_" not in k and not k.endswith("_extra_state")}
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(plain)
    torch.testing.assert_close(fresh.eval()(x), y, rtol=0, atol=1e-5)
    for _ in range(2):  # steps while merged: the head only (the factors get no gradient)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    unmerge_lora(model)
    now = model.state_dict()
    for k in after:
        if ".base." in k:
            assert torch.equal(now[k], after[k]), k


def test_adapters_equal_the_copy_sum_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    ref = copy.deepcopy(net)
    conv_a, lin_a = add_adapters(net, bottleneck=2, copies=3, density=0.5,
                                 targets=[nn.Conv2d, nn.Linear], activation="gelu")
    for a in (conv_a, lin_a):
        for p in (a.adapter_up, a.adapter_up_bias, a.adapter_down_bias):
            nn.init.normal_(p)

    def adapt(a, h, dim):
        hm = h.movedim(dim, -1)
        s = sum(F.gelu(hm @ (a.adapter_down * a.mask_down[i]).T + a.adapter_down_bias)
                @ (a.adapter_up * a.mask_up[i]).T for i in range(a.copies))
        return h + (s + a.adapter_up_bias).movedim(-1, dim)

    x = torch.randn(3, 2, 8, 8)
    h = adapt(lin_a, ref[3](ref[2](ref[1](adapt(conv_a, ref[0](x), 1)))), -1)
    torch.testing.assert_close(net(x), h, rtol=0, atol=1e-5)


class _Interrupt(nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


def test_copy_and_save_after_a_pass_cut_short_by_ctrl_c():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    (layer, _) = add_lora(net, rank=2, copies=2, density=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 1, 7, 7)
    y = net(x)
    net.append(_Interrupt())
    with pytest.raises(KeyboardInterrupt):
        net(x)
    del net[3]
    twin = copy.deepcopy(net)  # failed: deepcopy of the formed (non-leaf) tensor, the frame
    buf = io.BytesIO()
    torch.save(net, buf)  # failed: cannot pickle 'frame' object
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded, net):
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
    expected = F.conv2d(x, net[0].base.weight + manual_delta(net[0]), net[0].base.bias)
    torch.testing.assert_close(twin[0](x), expected, rtol=0, atol=1e-5)


def test_wrapped_layers_answer_the_base_layers_attributes():
    model = wt.create_model("test_wt", num_classes=3, in_chans=1)
    head = model.head
    add_lora(model, rank=2, targets=["head", "cores"])
    assert model.head.in_features == head.in_features and model.head.out_features == 3
    assert model.head.weight is head.weight and model.head.bias is head.bias
    conv = model.cores[0].cell.conv1
    assert (conv.in_channels, conv.kernel_size, conv.padding) == (8, (3, 3), (1, 1))
    model(torch.randn(2, 1, 8, 8))
    assert model.jac_loss().item() == 0.0  # read head.weight.device: AttributeError before
    with pytest.raises(AttributeError):
        conv.no_such_attribute  # noqa: B018


def test_a_pattern_naming_only_unsupported_layers_says_so():
    # a 1-d CNN: targets="*" matched no layer and listed "candidate layers: none", not why
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 3, 2))
    with pytest.raises(ValueError, match=r"unsupported types: 0 \(Conv1d\), 2 "
                                         r"\(ConvTranspose2d\) \(LoRA / adapters wrap Conv2d, "
                                         r"Linear\)"):
        add_lora(net, rank=2, targets="*")
    with pytest.raises(ValueError, match=r"unsupported types: 0 \(Conv1d\) "):
        add_adapters(net, bottleneck=2, targets="0")
    with pytest.raises(ValueError) as err:  # a type target names no layer: no such note
        add_lora(net, rank=2, targets=nn.Linear)
    assert "unsupported" not in str(err.value)
