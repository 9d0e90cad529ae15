"""Acceptance-review regressions: models, masks, ODE and CapaBoost/PEFT used as a researcher
would (settings the checks misjudged, accounting under PEFT, errors that name their layer)."""

import re
import warnings

import pytest
import torch
from torch import nn

import wtmodels as wt
from benchmarks import capaboost
from wtmodels.masks import apply_masks
from wtmodels.model_config import ModelConfig, fields_without_effect
from wtmodels.models import model_summary
from wtmodels.peft import add_adapters, add_lora


@pytest.mark.parametrize("method", ["implicit_adams", "fixed_adams"])
def test_implicit_adams_reads_the_tolerances(method):
    # its Adams-Moulton corrector iterates until rtol / atol are met: the run must not refuse
    # --ode-rtol as a setting without effect
    assert "ode_rtol" not in fields_without_effect(ModelConfig(core="ode", ode_method=method))
    assert "ode_rtol" in fields_without_effect(ModelConfig(core="ode", ode_method="rk4"))
    assert "ode_rtol" in fields_without_effect(ModelConfig(core="ode", ode_method="explicit_adams"))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for tol in (1e-1, 1e-7):
        torch.manual_seed(0)
        model = wt.create_model("test_ode", in_chans=1, ode_method=method, depth=10,
                                ode_rtol=tol, ode_atol=tol).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # "functional iteration did not converge"
            outs.append(model(x))
    assert not torch.equal(outs[0], outs[1])


def test_nonzero_params_per_iter_of_a_masked_model_under_lora():
    # the frozen masked cell weights are not trainable parameters: their masks subtract nothing
    # (the count was -63808 for wt_s with K = 4 masks at density 0.25 under LoRA)
    for weight_norm in (False, True):
        model = wt.create_model("test_wt", in_chans=1, mask_k=2, mask_density=0.25,
                                weight_norm=weight_norm)
        add_lora(model, rank=2, copies=2, density=0.5, train_head=True)
        info = model_summary(model, (1, 8, 8))
        assert info["nonzero_params_per_iter"] == info["params"] > 0


def test_apply_masks_takes_one_layer_class():
    layer = apply_masks(nn.Linear(3, 4), k=2, types=nn.Linear)
    assert layer.weight_masks.shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"got \('Linear',\)"):
        apply_masks(nn.Linear(3, 4), k=2, types="Linear")


@pytest.mark.parametrize("numel", [1, 2, 3, 10, 576, 100_000])
def test_density_hint_of_a_too_sparse_mask_is_valid(numel):
    # round() halves to even: the hint 0.5 / numel (e.g. 0.05 for 10 entries) failed itself
    with pytest.raises(ValueError, match="rounds to 0 ones") as err:
        wt.make_masks((numel,), k=1, density=1e-9)
    hint = float(re.search(r">= ([0-9.e+-]+)", str(err.value)).group(1))
    assert int(wt.make_masks((numel,), k=1, density=hint).sum()) == 1


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


@pytest.mark.parametrize("kind", ["file", "below_file"])
def test_capaboost_cli_unusable_out_one_line_exit_2(tmp_path, capsys, kind):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "sub"
    assert capaboost.main(["--out", str(out), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err


def test_ode_core_takes_an_empty_batch():
    model = wt.create_model("test_ode", in_chans=1, ode_method="dopri5")
    assert model(torch.randn(0, 1, 5, 7)).shape == (0, 10)
