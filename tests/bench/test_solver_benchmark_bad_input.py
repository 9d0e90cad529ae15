"""The solver benchmark's command line: bad input is one line on stderr, exit 2,
and nothing written."""

import pytest
import torch

from benchmarks import solvers as solvers_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_creates_no_out_dir(tmp_path, capsys):
    # the --out directory was created before the CUDA check refused the run
    out = tmp_path / "new" / "dir"
    assert solvers_bench.main(["--quick", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("value", ["1001", "99999999999999999999"])
def test_max_iter_above_the_bound_is_refused(value, capsys):
    # 1e20 hung the run: torchdeq pads its traces to max_iter in a Python loop and its
    # Broyden allocates max_iter secant pairs per sample (B x C*H*W x max_iter floats, twice)
    with pytest.raises(SystemExit) as exc:
        solvers_bench.parse_args(["--quick", "--max-iter", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --max-iter must be >= 2 and <= 1000, got {value}\n"


def test_max_iter_bounds_themselves_are_accepted():
    assert solvers_bench.parse_args(["--max-iter", "1000"]).max_iter == 1000
    assert solvers_bench.parse_args(["--max-iter", "2"]).max_iter == 2
