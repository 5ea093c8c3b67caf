"""CPU threading defaults (issue 15): fewer, sleeping OpenMP threads when other processes hold cores at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bksdm import threads
from bksdm.threads import (
    ThreadGovernor,
    apply_cpu_defaults,
    busy_cores_elsewhere,
    cpu_thread_settings,
    governed_threads,
    threads_may_adapt,
)


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


class FakeMachine:
    """A machine whose CPU counters the test advances: ``others`` cores busy elsewhere, ``mine`` in this process."""

    def __init__(self, cores: int = 2) -> None:
        self.cores, self.now, self.total, self.idle, self.cpu = cores, 0.0, 0, 0, 0.0

    def run(self, seconds: float, others: float, mine: float) -> None:
        jiffies = round(seconds * 100 * self.cores)
        self.now += seconds
        self.total += jiffies
        self.idle += round(jiffies * (1 - (others + mine) / self.cores))
        self.cpu += mine * seconds


def governor(machine: FakeMachine, threads: int = 2, most: int = 2) -> tuple[ThreadGovernor, list[int]]:
    applied: list[int] = []
    g = ThreadGovernor(
        applied.append,
        threads,
        most,
        interval_s=2.0,
        machine=lambda: (machine.total, machine.idle),
        own=lambda: machine.cpu,
        clock=lambda: machine.now,
    )
    g.cores = machine.cores
    return g, applied


def test_the_governor_gives_up_a_thread_when_another_process_takes_a_core_and_takes_it_back_after() -> None:
    m = FakeMachine()
    g, applied = governor(m)
    m.run(2.0, others=0.0, mine=2.0)
    assert g.tick() == 2 and applied == []  # idle: nothing changes
    for _ in range(3):  # another process takes a core: the first reading only notes it, the second acts
        m.run(0.5, others=1.0, mine=1.0)
        g.tick()
        m.run(1.5, others=1.0, mine=1.0)
        g.tick()
    assert applied == [1] and g.threads == 1
    m.run(2.0, others=0.0, mine=1.0)
    assert g.tick() == 1  # one reading of an idle machine is not enough
    m.run(2.0, others=0.0, mine=1.0)
    assert g.tick() == 2 and applied == [1, 2]
    assert [count for _, count in g.changes] == [1, 2]


def test_the_governor_reads_the_machine_only_every_interval_and_ignores_one_burst() -> None:
    m = FakeMachine()
    reads: list[int] = []
    g, applied = governor(m)
    g.machine = lambda: reads.append(1) or (m.total, m.idle)
    for _ in range(10):  # steps of 0.1 s: one reading per 2 s
        m.run(0.1, others=0.0, mine=2.0)
        g.tick()
    assert len(reads) == 0
    m.run(1.1, others=0.0, mine=2.0)
    g.tick()
    assert len(reads) == 1
    m.run(2.0, others=1.5, mine=0.5)  # one busy window, then idle again: no change
    g.tick()
    m.run(2.0, others=0.0, mine=2.0)
    g.tick()
    assert applied == []


def test_the_governor_counts_what_others_leave_and_never_goes_below_one_or_above_its_most() -> None:
    g, _ = governor(FakeMachine(cores=8), threads=8, most=8)
    assert [g.wanted(x) for x in (0.0, 0.4, 0.6, 3.0, 7.9, 12.0)] == [8, 8, 7, 5, 1, 1]


def test_governed_threads_is_none_off_the_cpu_and_when_the_user_chose_and_restores_the_count(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("BKSDM_OMP_WAIT", raising=False)
    with governed_threads("meta") as g:
        assert g is None
    monkeypatch.setenv("BKSDM_OMP_WAIT", "active")
    with governed_threads("cpu") as g:
        assert g is None
    monkeypatch.setenv("BKSDM_OMP_WAIT", "auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not threads_may_adapt()
    monkeypatch.setitem(threads._SET_HERE, "OMP_NUM_THREADS", "2")  # bksdm set it at start: it may adapt
    assert threads_may_adapt()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delitem(threads._SET_HERE, "OMP_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the caller's count is the most a governor gives: nothing to govern
        with governed_threads("cpu") as g:
            assert g is None
        torch.set_num_threads(2)
        with governed_threads("cpu") as g:
            assert g is not None and g.max_threads == 2
            g.set_threads(1)  # as a change would
        assert torch.get_num_threads() == 2  # the loop's end restores it
    finally:
        torch.set_num_threads(before)
