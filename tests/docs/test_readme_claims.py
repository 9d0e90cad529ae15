"""README claims of the "Fixed-point solvers" and "Deep equilibrium layer" sections that no other
test pins: the benchmark ranges quoted from benchmarks/results/solvers*.md, the non-normal example
for ``div_factor=math.inf``, the DEQ keyword hints, and that autodiff transforms never give wrong
numbers (they raise, or match reverse mode)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import wtmodels as wt

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _cells(md: Path) -> dict[str, list[tuple[int, float]]]:
    """solver -> [(f_evals, overhead)] over the cells of a solvers*.md main table."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in md.read_text().splitlines():
        m = re.match(r"\| (\d+) \| (\d+) \| (\d+) \| (\w+) \| (\d+) \| [\d.]+ \| [\d.]+ \| "
                     r"([\d.]+) \|", line)
        if m:
            out.setdefault(m[4], []).append((int(m[5]), float(m[6])))
    return out


def _quoted_run(md: Path) -> Path:
    """``md`` if the README quotes the run it holds (its commit is named there); skipped after
    a local re-run of the benchmark, whose numbers the README does not claim."""
    sha = re.search(r"git `([0-9a-f]{7})", md.read_text())
    if sha is None or sha[1] not in (ROOT / "README.md").read_text():
        pytest.skip(f"{md.name} holds a run the README does not quote")
    return md


def _readme_row(label: str) -> list[tuple[float, float]]:
    """The ``a-b`` ranges of the README overhead-table row starting with ``label``."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| {label}"):
            return [(float(a), float(b)) for a, b in re.findall(r"([\d.]+)-([\d.]+)x", line)]
    raise AssertionError(f"README has no overhead row {label!r}")


def _fmt(values: list[float]) -> tuple[float, float]:
    """min-max as the README writes them: three significant digits."""
    return tuple(float(f"{v:.3g}") for v in (min(values), max(values)))


@pytest.mark.parametrize("label, md, solvers", [
    ("wtmodels, 2 CPU threads", "solvers.md", ["anderson", "broyden", "fixed_point"]),
    ("torchdeq 0.1.0, 2 CPU threads", "solvers.md", ["torchdeq_anderson", "torchdeq_broyden"]),
    ("wtmodels, 1 thread", "solvers_1thread.md", ["anderson", "broyden", "fixed_point"]),
    ("torchdeq 0.1.0, 1 thread", "solvers_1thread.md",
     ["torchdeq_anderson", "torchdeq_broyden"]),
])
def test_readme_overhead_ranges_are_the_results_min_max(label, md, solvers):
    cells = _cells(_quoted_run(RESULTS / md))
    assert all(len(cells[s]) == 6 for s in solvers)  # six cells per column
    expected = [_fmt([o for _, o in cells[s]]) for s in solvers]
    assert _readme_row(label) == expected


@pytest.mark.parametrize("md", ["solvers.md", "solvers_1thread.md"])
def test_readme_f_evaluation_claims(md):
    # "Anderson 23-26 vs 24-33, Broyden equal"
    cells = _cells(_quoted_run(RESULTS / md))
    ours = [n for n, _ in cells["anderson"]]
    theirs = [n for n, _ in cells["torchdeq_anderson"]]
    assert (min(ours), max(ours), min(theirs), max(theirs)) == (23, 26, 24, 33)
    assert all(a <= b for a, b in zip(ours, theirs, strict=True))
    assert [n for n, _ in cells["broyden"]] == [n for n, _ in cells["torchdeq_broyden"]]


def test_non_normal_map_needs_div_factor_inf():
    # z = A z + b with A = [[0.97, 30], [0, 0.97]] (rho 0.97 < 1) converges, but its residual
    # first grows ~30-fold: the default rule stops it as diverged, div_factor=inf does not
    A = torch.tensor([[0.97, 30.0], [0.0, 0.97]], dtype=torch.float64)
    b = torch.ones(1, 2, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, b[0])

    def f(z):
        return z @ A.T + b

    z0 = torch.zeros(1, 2, dtype=torch.float64)
    _, stats = wt.solve(f, z0, method="fixed_point", max_iter=2000, tol=1e-10)
    assert stats.diverged.all() and not stats.converged.any()
    z, stats = wt.solve(f, z0, method="fixed_point", max_iter=2000, tol=1e-10,
                        div_factor=math.inf)
    assert stats.converged.all() and not stats.diverged.any()
    torch.testing.assert_close(z[0], exact, rtol=1e-7, atol=0)


def test_deq_keyword_hints():
    with pytest.raises(ValueError, match=r"f_max_iter"):
        wt.DEQ(max_iter=5)
    with pytest.raises(ValueError, match=r"go in f_opts / b_opts"):
        wt.DEQ(m=5)
    with pytest.raises(ValueError, match=r"valid: \['jac_reg'\]"):
        wt.DEQ()(torch.cos, torch.zeros(2, 3), foo=1)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*deprecated:FutureWarning")  # torch.func
@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_autodiff_transforms_raise_or_match_reverse_mode(grad):
    # never wrong numbers: torch.func and forward-mode AD either fail or agree with the
    # reverse-mode Jacobian of the same DEQ
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    deq = wt.DEQ(grad=grad, f_tol=1e-10, b_tol=1e-10, f_max_iter=100, b_max_iter=100)

    def out(b):
        return deq(lambda z: torch.tanh(z @ A.T) + b, torch.zeros(3, 4, dtype=torch.float64))[0]

    jac = torch.autograd.functional.jacobian(out, x)  # reverse mode, one row at a time
    expected = torch.einsum("ijkl,kl->ij", jac, t)
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda b: out(b).sum())(x)
    try:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(out(fwAD.make_dual(x, t))).tangent
    except (RuntimeError, NotImplementedError):
        return
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=1e-8, atol=1e-10)
