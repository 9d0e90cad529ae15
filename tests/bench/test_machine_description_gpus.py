"""`describe_machine` lists GPUs only from a working nvidia-smi (a failing one prints its reason on
stdout), each with a known answer."""

from __future__ import annotations

import subprocess

import benchmarks.provenance as prov

_REAL_RUN = subprocess.run


def _fake_nvidia_smi(returncode: int, stdout: str):
    def run(cmd, *args, **kwargs):
        if cmd and cmd[0] == "nvidia-smi":
            return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")
        return _REAL_RUN(cmd, *args, **kwargs)
    return run


def test_failing_nvidia_smi_records_no_gpu(monkeypatch):
    """nvidia-smi prints its failure on stdout (exit 9 without a driver, 6 without a device):
    the machine record listed that sentence as a GPU."""
    for code, text in ((9, "NVIDIA-SMI has failed because it couldn't communicate with the "
                           "NVIDIA driver. Make sure that the latest NVIDIA driver is installed "
                           "and running.\n\n"),
                       (6, "No devices were found\n")):
        monkeypatch.setattr(prov.subprocess, "run", _fake_nvidia_smi(code, text))
        assert prov.describe_machine(sha="abc")["gpus"] == []


def test_working_nvidia_smi_lists_each_gpu(monkeypatch):
    text = "NVIDIA H200, 143771 MiB\nNVIDIA H200, 143771 MiB\n"
    monkeypatch.setattr(prov.subprocess, "run", _fake_nvidia_smi(0, text))
    assert prov.describe_machine(sha="abc")["gpus"] == ["NVIDIA H200, 143771 MiB"] * 2
