"""Threads: the CLI makes idle OpenMP threads sleep (set before torch loads) and takes ``--threads``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyorder.cli import main
from anyorder.threads import set_threads

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    e.update(PYTHONPATH=SRC, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout


def test_the_cli_sets_a_passive_wait_policy_before_torch_loads():
    out = _python("import sys, anyorder.threads; print('torch' in sys.modules); "
                  "import anyorder.cli, os; print(os.environ['OMP_WAIT_POLICY'])")
    assert out.split() == ["False", "PASSIVE"]  # nothing before the policy imports torch


def test_a_wait_policy_the_user_set_is_kept():
    out = _python("import anyorder.cli, os; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE")
    assert out.strip() == "ACTIVE"


def test_threads_option_sets_torch_threads_and_is_validated(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["orders", "--threads", "2"]) == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["toy", "--threads", "0"]) == 2
    assert "argument --threads: must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1, got -1"):
        set_threads(-1)
