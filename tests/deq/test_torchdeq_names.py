"""A torchdeq user's settings: every keyword torchdeq's DEQ takes is either one of ours or
refused with what to write instead (torchdeq itself ignores keywords it does not know), and the
replacement named in the message is accepted."""

from __future__ import annotations

import inspect

import pytest
import torch

import wtmodels as wt
from wtmodels.implicit import TORCHDEQ_KEYWORDS


def _message(**kwargs) -> str:
    with pytest.raises(ValueError) as err:
        wt.DEQ(**kwargs)
    return str(err.value)


@pytest.mark.parametrize("name, value, says", [
    ("f_stop_mode", "rel", "f_stop_mode: stop_mode"),
    ("b_stop_mode", "abs", "b_stop_mode: stop_mode"),
    ("ift", True, "ift: grad='ift'"),
    ("eval_factor", 2.0, "eval_f_max_iter=<iterations>"),
    ("n_states", 2, "n_states: no equivalent"),
    ("core", "sliced", "core: no equivalent"),
])
def test_torchdeq_keyword_is_refused_naming_ours(name, value, says):
    message = _message(**{name: value})
    assert f"unknown keyword(s) ['{name}']" in message and "'stop_mode'" in message
    assert f"torchdeq's {name}" in message and says in message


def test_torchdeq_integer_grad_names_phantom_steps():
    message = _message(grad=3)
    assert "['ift', 'phantom', 'unroll']" in message
    assert "grad='phantom', phantom_steps=3" in message
    assert "torchdeq" not in _message(grad="implicit")  # a plain typo gets no torchdeq hint


@pytest.mark.parametrize("name", ["fixed_point_iter", "simple_fixed_point_iter"])
def test_torchdeq_solver_names_point_to_fixed_point(name):
    assert "'fixed_point' here" in _message(f_solver=name)
    assert "'fixed_point' here" in _message(b_solver=name)
    with pytest.raises(ValueError, match="'fixed_point' here"):
        wt.solve(lambda z: 0.5 * z, torch.zeros(2, 3), method=name)


def test_the_named_replacements_solve_the_same_problem():
    # torchdeq: get_deq(f_solver="fixed_point_iter", f_stop_mode="rel", grad=3, ...);
    # ours as the messages say: z = 0.5 z + 1 has z* = 2 and dz*/db = 2 per entry
    b = torch.ones(2, 3, requires_grad=True)
    deq = wt.DEQ(f_solver="fixed_point", stop_mode="rel", grad="phantom", phantom_steps=3,
                 f_tol=1e-7, f_max_iter=100)
    z, stats = deq(lambda z: 0.5 * z + b, torch.zeros(2, 3))
    assert torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-5) and bool(stats.converged.all())
    z.sum().backward()
    # phantom, 3 steps of tau 1 from z*: 1 + 0.5 + 0.25 = 1.75 (the exact gradient is 2)
    assert torch.allclose(b.grad, torch.full((2, 3), 1.75))


def test_every_keyword_of_torchdeqs_deq_is_ours_or_explained():
    core = pytest.importorskip("torchdeq.core")
    theirs = set()
    for cls in (core.DEQBase, core.DEQIndexing, core.DEQSliced):
        theirs |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                   if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    theirs.add("core")  # get_deq's choice of class
    ours = set(inspect.signature(wt.DEQ.__init__).parameters) - {"self", "unknown"}
    assert theirs - ours - set(TORCHDEQ_KEYWORDS["DEQ"]) == set()


def test_every_keyword_of_a_torchdeq_call_is_explained():
    core = pytest.importorskip("torchdeq.core")
    theirs = set()
    for cls in (core.DEQIndexing, core.DEQSliced):
        theirs |= {n for n, p in list(inspect.signature(cls.forward).parameters.items())[3:]
                   if p.kind is not inspect.Parameter.VAR_KEYWORD}  # after self, func, z
    assert theirs and theirs - set(TORCHDEQ_KEYWORDS["DEQ.forward"]) == set()
    deq = wt.DEQ()
    with pytest.raises(ValueError, match=r"torchdeq's solver_kwargs: DEQ\(f_opts="):
        deq(lambda z: 0.5 * z, torch.zeros(2, 3), solver_kwargs={"m": 3})
    with pytest.raises(ValueError, match=r"sradius_mode: deq.spectral_radius"):
        deq(lambda z: 0.5 * z, torch.zeros(2, 3), sradius_mode=True)
