"""Whole models as a practitioner uses them (wrappers, dtypes, layouts, depth, copies).

Known answers: parameter counts by hand (test_* variants, in_chans=1: stem conv 1*8*9 = 72 +
GroupNorm 16; one cell 2 * 8*8*9 + 3 * 16 = 1200; head 8*10 + 10 = 90), and oracles that do not
share the code path under test (the eager model for torch.compile, a freshly built model of the
other depth for set_depth, the contiguous fp32 model for channels_last / float64 / DataParallel).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import wtmodels as wt
from wtmodels.accounting import model_summary, nonzero_params_per_iter

TIED_PARAMS = 72 + 16 + 1200 + 90  # 1378
UNTIED_PARAMS = 72 + 16 + 2 * 1200 + 90  # 2578
FAMILIES = ("test_wt", "test_deq", "test_ode", "test_untied")


def _images(b=4, c=1, h=8, w=8, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- accounting through wrappers


def test_summary_of_a_dataparallel_model_counts_the_inner_model():
    # before the fix: default input (3, 32, 32) for an in_chans=1 model (ValueError), the untied
    # model's nonzero_params_per_iter counted every cell (2578) and cell_evals was 0
    model = wt.create_model("test_untied", in_chans=1)
    wrapped = torch.nn.DataParallel(model)
    info = model_summary(wrapped)
    assert info["params"] == UNTIED_PARAMS
    assert info["nonzero_params_per_iter"] == TIED_PARAMS
    assert nonzero_params_per_iter(wrapped) == TIED_PARAMS
    assert info["cell_evals"] == 2.0
    assert info == model_summary(model)


def test_summary_of_a_dataparallel_deq_with_jac_reg_on():
    # before the fix: the wrapper hid the cores, so the regulariser stayed on inside the FLOP
    # counter and autograd.grad failed (RuntimeError)
    model = wt.create_model("test_deq", in_chans=1)
    model.set_jac_reg(True)
    info = model_summary(torch.nn.DataParallel(model), (1, 8, 8))
    assert info["params"] == TIED_PARAMS
    assert model.cores[0].jac_reg is True  # switched back on


def test_summary_restores_each_submodule_mode():
    # a frozen part kept in eval mode (e.g. dropout off while fine-tuning) stays in eval mode;
    # before the fix model.train(True) put every submodule back in training mode
    model = wt.create_model("test_wt", in_chans=1, dropout=0.3).train()
    model.cores[0].cell.drop.eval()
    model.stem.eval()
    model_summary(model, (1, 8, 8))
    assert model.training is True
    assert model.cores[0].cell.drop.training is False
    assert model.stem.training is False
    assert model.head.training is True


# ---------------------------------------------------------------- layouts, dtypes, wrappers


@pytest.mark.parametrize("name", FAMILIES)
def test_channels_last_float64_and_dataparallel_match_the_plain_model(name):
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=3, mask_k=2)
    x, y = _images(c=3, h=9, w=13), torch.tensor([0, 3, 5, 9])
    variants = {
        "plain": (copy.deepcopy(model), x),
        "channels_last": (copy.deepcopy(model).to(memory_format=torch.channels_last),
                          x.contiguous(memory_format=torch.channels_last)),
        "dataparallel": (torch.nn.DataParallel(copy.deepcopy(model)), x),
        "float64": (copy.deepcopy(model).double(), x.double()),
    }
    outs, grads = {}, {}
    for key, (m, inp) in variants.items():
        # with a GPU, DataParallel moves the model to cuda:0 (TF32 off there: float32 as here)
        with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
            out = m(inp)
            F.cross_entropy(out, y.to(out.device)).backward()
        outs[key] = out.float().cpu()
        grads[key] = [p.grad.float().cpu() for p in m.parameters()]
    assert variants["float64"][0].head.weight.dtype == torch.float64
    assert all(b.dtype == torch.bool for n, b in variants["float64"][0].named_buffers()
               if n.endswith("weight_masks"))
    for key in ("channels_last", "dataparallel", "float64"):
        torch.testing.assert_close(outs[key], outs["plain"], rtol=1e-4, atol=1e-5)
        for g, ref in zip(grads[key], grads["plain"]):
            assert (g - ref).norm() <= 1e-3 * ref.norm() + 1e-7, key


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_autocast_is_finite_and_close_to_fp32(name):
    model = wt.create_model(name, in_chans=1, mask_k=2).eval()
    x = _images()
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


# ---------------------------------------------------------------- batch, sizes, determinism


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_is_deterministic_and_batch_independent(name):
    model = wt.create_model(name, in_chans=1, mask_k=2).eval()
    x = _images(b=5)
    out = model(x)
    assert torch.equal(model(x), out)
    singles = torch.cat([model(x[i:i + 1]) for i in range(5)])  # batch size 1
    torch.testing.assert_close(singles, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_larger_non_square_images(name):
    model = wt.create_model(name, in_chans=1)  # built for 8x8 digits
    out = model(_images(b=2, h=28, w=20))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# ---------------------------------------------------------------- copies and loading


@pytest.mark.parametrize("name", FAMILIES)
def test_pickle_deepcopy_and_state_dict_into_another_mask_seed(name):
    model = wt.create_model(name, in_chans=1, mask_k=2).eval()
    x = _images()
    out = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), out)
    assert torch.equal(copy.deepcopy(model)(x), out)
    other = wt.create_model(name, in_chans=1, mask_k=2, mask_seed=7).eval()
    assert not torch.equal(other.cores[0].state_dict()[_mask_key(other)],
                           model.cores[0].state_dict()[_mask_key(model)])
    other.load_state_dict(model.state_dict())  # the masks come with the state_dict
    assert torch.equal(other(x), out)


def _mask_key(model):
    return next(k for k in model.cores[0].state_dict() if k.endswith("weight_masks"))


# ---------------------------------------------------------------- set_depth


@pytest.mark.parametrize("name,extra", [
    ("test_wt", {}), ("test_wt", {"mask_k": 3, "mask_schedule": "block"}),
    ("test_ode", {"mask_k": 2}), ("test_ode", {"ode_method": "dopri5"}),
    ("test_deq", {"mask_k": 2})])
def test_set_depth_equals_a_fresh_model_of_that_depth(name, extra):
    model = wt.create_model(name, in_chans=1, **extra).eval()
    x = _images()
    for depth in (1, 3):
        moved = copy.deepcopy(model)
        moved.set_depth(depth)
        if name == "test_deq":  # solver budget `depth`, train and eval
            fresh = wt.create_model(name, in_chans=1, f_max_iter=depth, eval_f_max_iter=depth,
                                    **extra)
        elif name == "test_ode":  # same segment length: end time T * depth / 2
            fresh = wt.create_model(name, in_chans=1, depth=depth,
                                    ode_T=model.config.ode_T * depth / 2, **extra)
        else:
            fresh = wt.create_model(name, in_chans=1, depth=depth, **extra)
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        torch.testing.assert_close(moved(x), fresh(x), rtol=1e-6, atol=1e-7)
        assert moved.core_stats() == fresh.core_stats()
    with pytest.raises(ValueError, match="untied"):
        wt.create_model("test_untied", in_chans=1).set_depth(3)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", ["test_wt", "test_untied"])
def test_compile_matches_eager_outputs_gradients_and_set_depth(name):
    # aot_eager traces with dynamo + AOT autograd as inductor does (measured with inductor too:
    # test_wt / test_untied / test_ode / test_deq within 1e-7 / 2e-6; 20-150 s to compile here)
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, mask_k=2)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    x, y = _images(), torch.tensor([1, 2, 3, 4])
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(compiled(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
    model.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    if name == "test_wt":  # a guard on the depth: recompiles rather than reusing depth 2
        model.set_depth(3)
        compiled.set_depth(3)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        assert compiled.core_stats() == {"cell_evals": 3.0}
    assert model_summary(compiled, (1, 8, 8)) == model_summary(model, (1, 8, 8))


def test_summary_under_inference_mode_with_weight_norm():
    # before the fix: AttributeError "'ParametrizedConv2d' object has no attribute 'weight'"
    # (the FLOP counter's module tracker hooks the parametrization's parameters, which have no
    # autograd node under inference_mode)
    model = wt.create_model("test_wt", in_chans=1, weight_norm=True, mask_k=2)
    plain = model_summary(model, (1, 8, 8))
    with torch.inference_mode():
        info = model_summary(model, (1, 8, 8))
    assert info == plain
    assert info["params"] == TIED_PARAMS + 2 * 8  # weight norm adds g: 8 per cell conv
    assert info["cell_evals"] == 2.0


def test_deq_cores_run_eagerly_under_compile_where_dynamo_cannot_trace_the_solver(monkeypatch):
    # torch 2.4's dynamo crashed inside the solvers ('NoneType' object has no attribute
    # 'as_proxy'); there every DEQ core is a graph break, elsewhere only one with jac_reg
    import wtmodels.models as models_mod

    model = wt.create_model("test_deq", in_chans=1, f_max_iter=4, b_max_iter=4)
    core = next(c for c in model.cores if isinstance(c, models_mod.DEQCore))
    monkeypatch.setattr(models_mod, "DEQ_EAGER_UNDER_COMPILE", False)
    assert not models_mod._runs_eagerly(core)
    core.set_jac_reg(True)
    assert models_mod._runs_eagerly(core)
    core.set_jac_reg(False)
    monkeypatch.setattr(models_mod, "DEQ_EAGER_UNDER_COMPILE", True)
    assert models_mod._runs_eagerly(core)
    twin = copy.deepcopy(model)
    x, y = _images(), torch.tensor([1, 2, 3, 4])
    for run in (model, torch.compile(twin, backend="aot_eager")):
        F.cross_entropy(run(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_compiled_deq_trains_with_the_jacobian_regulariser(grad):
    # before the fix: loss.backward() raised "torch.compile with aot_autograd does not currently
    # support double backward" (`--compile --jac-reg-weight` crashed a DEQ run at its first step)
    import torch._functorch.config as functorch_config

    model = wt.create_model("test_deq", in_chans=1, grad=grad, f_max_iter=4, b_max_iter=4)
    twin = copy.deepcopy(model)
    x, y = _images(), torch.tensor([1, 2, 3, 4])
    saved = getattr(functorch_config, "donated_buffer", None)  # (torch 2.4 has no such flag)
    if saved is not None:
        functorch_config.donated_buffer = False  # as the README asks for a compiled DEQ
    try:
        compiled = torch.compile(twin, backend="aot_eager")
        for m, run in ((model, model), (twin, compiled)):
            m.set_jac_reg(True)
            torch.manual_seed(3)  # the Hutchinson probes
            loss = F.cross_entropy(run(x), y) + 0.5 * m.jac_loss()
            loss.backward()
    finally:
        if saved is not None:
            functorch_config.donated_buffer = saved
    assert model.jac_loss() > 0
    torch.testing.assert_close(twin.jac_loss(), model.jac_loss(), rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_compiled_dopri5_ode_trains():
    # before the fix: backward raised "Output 0 of Slice is a view and its base ... has been
    # modified inplace" (torchdiffeq's adaptive Runge-Kutta step under torch.compile): ode_m
    # (dopri5) could not train with --compile
    model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5", depth=1)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    x, y = _images(b=2), torch.tensor([1, 2])
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(compiled(x), y).backward()
    assert compiled.core_stats() == model.core_stats()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
