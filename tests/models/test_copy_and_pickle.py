"""Models and masked layers survive ``copy.deepcopy``, ``pickle`` and ``torch.save`` /
``torch.load``: a DEQ model after a training step with the Jacobian regulariser (the copy holds
the same weights and gives the same output, without the original's regulariser graph), and a
masked layer whose class is a plain subclass of ``nn.Linear`` (its output checked against the
selected mask applied by hand)."""

import torch

import wtmodels as wt


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
