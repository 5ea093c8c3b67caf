"""CPU threading defaults (issue 15): OpenMP's waiting threads sleep unless the user says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bksdm.threads import apply_cpu_defaults, cpu_thread_settings


def test_passive_waiting_is_the_default_and_the_users_settings_win() -> None:
    assert cpu_thread_settings({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_thread_settings({"OMP_WAIT_POLICY": "ACTIVE"}) == {}  # the user's own OpenMP setting
    assert cpu_thread_settings({"BKSDM_OMP_WAIT": "active"}) == {}  # bksdm's switch back to spinning
    assert cpu_thread_settings({"BKSDM_OMP_WAIT": " Passive "}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_NUM_THREADS": "2"}
    assert apply_cpu_defaults(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="BKSDM_OMP_WAIT='spin': use one of passive, active"):
        cpu_thread_settings({"BKSDM_OMP_WAIT": "spin"})


def probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh interpreter that enters through the CLI package, then reports what torch's OpenMP was given."""
    code = "import bksdm.cli, os, sys, torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BKSDM_OMP_WAIT")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_the_cli_sets_it_before_torch_loads_and_refuses_a_bad_value() -> None:
    assert probe({}).stdout.split() == ["PASSIVE", "True"]
    assert probe({"OMP_WAIT_POLICY": "ACTIVE"}).stdout.split() == ["ACTIVE", "True"]
    # Whether torch was loaded when the CLI package applied the defaults (OpenMP reads them once, at load).
    code = (
        "import sys, bksdm.threads as t; real = t.apply_cpu_defaults; "
        "t.apply_cpu_defaults = lambda *a: print('torch loaded:', 'torch' in sys.modules) or real(*a); "
        "import bksdm.cli"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "torch loaded: False\n"
    )
    env = {**os.environ, "BKSDM_OMP_WAIT": "spin"}
    bad = subprocess.run([sys.executable, "-m", "bksdm.cli", "--version"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "bksdm: error: BKSDM_OMP_WAIT='spin': use one of passive, active"
