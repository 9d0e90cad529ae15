"""Device handling checked on the CPU: what runs on a GPU is exercised here by fakes.

- the solvers' and the DEQ's accelerator code path (per-sample arrays copied to and from the
  host, never shared) gives exactly what the CPU path gives;
- ``f`` or a registered solver handing back a tensor on another device is a ``ValueError``
  naming both devices (the "meta" device stands in for a GPU);
- a checkpoint written on a GPU (its storages tagged ``cuda:0``) resumes on a CPU-only machine,
  and GPU generator states saved by a process that saw more GPUs than the resuming one are
  restored for the GPUs there are;
- ``LOCAL_RANK`` beyond the visible GPUs is a ``ValueError``, not a CUDA error.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.serialization

import wtmodels as wt
from wtmodels import checkpoint as ckpt_mod
from wtmodels.distributed import DistContext
from wtmodels.solvers import common
from wtmodels.train import run

F64 = torch.float64
SOLVERS = ("fixed_point", "anderson", "broyden")


@pytest.fixture
def host_copies(monkeypatch):
    """Make every solve take the accelerator code path on CPU tensors (host copies)."""
    original = common.Small.__init__

    def as_if_on_a_device(self, like):
        original(self, like)
        self.cpu = False

    monkeypatch.setattr(common.Small, "__init__", as_if_on_a_device)
    monkeypatch.setattr(common.Small, "of", lambda self, t: t.detach().numpy().copy())
    monkeypatch.setattr(common.Small, "torch", lambda self, a: torch.from_numpy(a.copy()))


def _deq_run(grad):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6, dtype=F64)
    with torch.no_grad():
        lin.weight.mul_(0.6 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(5, 6, dtype=F64)
    x[3] = 40.0  # sample 3 runs off (exp overflows): never converges, kept finite

    def f(z):
        out = torch.tanh(lin(z)) + x
        return torch.where(x[:, :1] > 30, torch.exp(30 * z), out)

    deq = wt.DEQ(f_solver="anderson", f_max_iter=40, f_tol=1e-9, b_max_iter=40, b_tol=1e-9,
                 grad=grad, stop_mode="abs")
    z, stats = deq(f, torch.zeros(5, 6, dtype=F64))
    z[torch.arange(5) != 3].sum().backward()
    return z.detach(), lin.weight.grad.clone(), stats


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_deq_accelerator_code_path_equals_the_cpu_path(grad, monkeypatch, request):
    z_cpu, g_cpu, s_cpu = _deq_run(grad)
    request.getfixturevalue("host_copies")
    z_dev, g_dev, s_dev = _deq_run(grad)
    assert s_dev.diverged.tolist() == s_cpu.diverged.tolist()
    assert s_dev.converged.tolist() == [True, True, True, False, True]
    assert torch.equal(z_dev, z_cpu) and torch.equal(g_dev, g_cpu)
    for name in ("nstep", "abs_lowest", "rel_lowest", "abs_trace", "rel_trace"):
        assert torch.equal(getattr(s_dev, name), getattr(s_cpu, name)), name


@pytest.mark.parametrize("method", SOLVERS)
def test_accelerator_path_freezes_stopped_samples_like_the_cpu_path(method, request):
    # samples converge at different steps: the frozen rows (index_copy_ with host-made
    # indices) and the traces must equal the CPU path's
    scale = torch.tensor([0.1, 0.5, 0.9, 0.7], dtype=F64)[:, None]

    def f(z):
        return scale * torch.sin(z) + 1.0

    z0 = torch.zeros(4, 3, dtype=F64)
    z_cpu, s_cpu = wt.solve(f, z0, method=method, max_iter=100, tol=1e-10)
    request.getfixturevalue("host_copies")
    z_dev, s_dev = wt.solve(f, z0, method=method, max_iter=100, tol=1e-10)
    assert len(set(s_cpu.nstep.tolist())) > 1 and bool(s_cpu.converged.all())
    assert torch.equal(z_dev, z_cpu) and torch.equal(s_dev.nstep, s_cpu.nstep)
    assert torch.equal(s_dev.abs_trace, s_cpu.abs_trace)


@pytest.mark.parametrize("method", SOLVERS)
def test_f_returning_another_device_is_a_value_error(method):
    with pytest.raises(ValueError, match=r"device of z0 \(cpu\).*meta"):
        wt.solve(lambda z: torch.empty(z.shape, device="meta"), torch.zeros(2, 3),
                 method=method)


def test_unrolled_deq_f_returning_another_device_is_a_value_error():
    deq = wt.DEQ(grad="unroll")
    with pytest.raises(ValueError, match=r"device of z0 \(cpu\).*meta"):
        deq(lambda z: torch.empty(z.shape, device="meta"), torch.zeros(2, 3))


def test_registered_solver_returning_another_device_is_a_value_error(monkeypatch):
    # a private copy of the registry: the registration must not leak into other tests
    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))

    def to_meta(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
        z, stats = wt.solvers.fixed_point(f, z0, max_iter=max_iter, tol=tol)
        return z.to("meta"), stats

    wt.register_solver("test_devices_to_meta", to_meta, overwrite=True)
    with pytest.raises(ValueError, match="test_devices_to_meta.*device of z0 \\(cpu\\).*meta"):
        wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), method="test_devices_to_meta")
    deq = wt.DEQ(f_solver="test_devices_to_meta")  # its output would be a meta tensor
    with pytest.raises(ValueError, match="device of z0"):
        deq(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3))


def _retag_as_cuda(path, extra_cuda_states=0):
    """Rewrite a checkpoint as a GPU run would have written it: storages tagged cuda:0."""
    state = torch.load(path, weights_only=True)
    for rng in state["rng"]:
        # a CUDA generator's state: its seed, then a Philox offset (a multiple of 4); a state
        # torch refuses would poison the next CUDA initialisation on a machine with a GPU
        rng["cuda"] = [torch.tensor([1234 + i, 8 * i], dtype=torch.int64).view(torch.uint8)
                       for i in range(extra_cuda_states)]
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = real


def test_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, train_killed_after_epoch):
    settings = dict(model="test_wt", dataset="digits", train_size=64, test_size=32,
                    batch_size=32, threads=1, progress="none", seed=1, device="cpu", epochs=2)
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run({**settings, "out": str(ref)})
    train_killed_after_epoch({**settings, "out": str(moved)})
    _retag_as_cuda(moved / "checkpoint.pt", extra_cuda_states=2)
    if not torch.cuda.is_available():  # what a plain torch.load does with such a file here
        with pytest.raises((RuntimeError, pickle.UnpicklingError), match="CUDA"):  # (torch 2.4)
            torch.load(moved / "checkpoint.pt", weights_only=True)
    assert ckpt_mod.load_checkpoint(moved / "checkpoint.pt")["model"]
    run({"out": str(moved), "resume": True, "progress": "none"})
    rows = [[{k: v for k, v in json.loads(line).items()
              if k not in ("epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb")}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, moved)]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    wa = ckpt_mod.load_checkpoint(ref / "checkpoint.pt")["model"]
    wb = ckpt_mod.load_checkpoint(moved / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cuda_rng_states_of_more_gpus_than_visible_restore_those_there_are(monkeypatch):
    state = ckpt_mod.capture_rng_state()
    state["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in range(3)]  # saved with 3
    restored = {}

    def set_rng_state(new_state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= 1:  # a machine with one GPU
            raise IndexError("tuple index out of range")
        restored[index] = int(new_state[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    ckpt_mod.restore_rng_state(state)
    assert restored == {0: 0}


def test_local_rank_beyond_the_visible_gpus_is_a_value_error(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 .* 2 visible CUDA device"):
        DistContext.from_env("cuda")
    assert chosen == []
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DistContext.from_env("cuda")
    assert chosen == [1] and ctx.device == torch.device("cuda", 1) and ctx.world_size == 1
