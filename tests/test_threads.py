"""CPU threading defaults (issue 15): fewer, sleeping OpenMP threads when other processes hold cores at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bksdm.threads import apply_cpu_defaults, busy_cores_elsewhere, cpu_thread_settings


def test_auto_changes_nothing_on_an_idle_machine_and_gives_free_cores_to_sleeping_threads_otherwise() -> None:
    def busy(cores_elsewhere: float | None):
        return lambda: cores_elsewhere

    assert cpu_thread_settings({}, busy=busy(0.1), cores=2) == {}  # idle: OpenMP's own default stays
    assert cpu_thread_settings({}, busy=busy(None), cores=2) == {}  # cannot tell (no /proc/stat): unchanged
    one_busy = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_thread_settings({}, busy=busy(1.0), cores=2) == one_busy
    assert cpu_thread_settings({}, busy=busy(2.0), cores=2) == one_busy  # never fewer than one thread
    assert cpu_thread_settings({}, busy=busy(1.2), cores=8) == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_users_settings_win_and_bksdm_omp_wait_chooses() -> None:
    def never():
        raise AssertionError("the machine is not measured when the choice is made already")

    assert cpu_thread_settings({"OMP_WAIT_POLICY": "ACTIVE"}, busy=never, cores=2) == {}
    assert cpu_thread_settings({"OMP_NUM_THREADS": "2"}, busy=never, cores=2) == {}
    assert cpu_thread_settings({"BKSDM_OMP_WAIT": "active"}, busy=never, cores=2) == {}
    assert cpu_thread_settings({"BKSDM_OMP_WAIT": " Passive "}, busy=never, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"BKSDM_OMP_WAIT": "auto"}
    assert apply_cpu_defaults(environ, busy=lambda: 1.0, cores=2) == {
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert environ == {"BKSDM_OMP_WAIT": "auto", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="BKSDM_OMP_WAIT='spin': use one of auto, active, passive"):
        cpu_thread_settings({"BKSDM_OMP_WAIT": "spin"})


def test_busy_cores_are_measured_from_proc_stat() -> None:
    elsewhere = busy_cores_elsewhere(0.05)
    assert elsewhere is None or 0 <= elsewhere <= (os.cpu_count() or 1)


def probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh interpreter that enters through the CLI package, then reports what torch's OpenMP was given."""
    code = "import bksdm.cli, os, sys, torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BKSDM_OMP_WAIT", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_the_cli_sets_it_before_torch_loads_and_refuses_a_bad_value() -> None:
    assert probe({"BKSDM_OMP_WAIT": "passive"}).stdout.split() == ["PASSIVE", "True"]
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
    assert bad.stderr.strip() == "bksdm: error: BKSDM_OMP_WAIT='spin': use one of auto, active, passive"
