"""CPU threading that survives other work on the machine, chosen before torch loads.

PyTorch's CPU kernels run on OpenMP threads (GNU libgomp in the Linux wheels) that spin while they wait for each
other. When another process holds a core, every parallel region waits for the descheduled thread and throughput
collapses. Measured on a 2-core AMD EPYC with ``bksdm generate`` on the bundled teacher
(``benchmarks/cpu_contention.py``): idle, the default (2 spinning threads) made 8.0 images/s, one thread 6.1, two
threads with ``OMP_WAIT_POLICY=PASSIVE`` 4.4 (sleeping and waking costs more than the bundled model's short
kernels); beside one busy process, the default fell to 2.2 (27% of its idle figure) while one thread kept 6.3.

So bksdm looks before it starts (``auto``, the default): it samples the machine's CPU use for 0.1 s; when other
processes hold enough of it that bksdm's threads would not each get a core, it runs as many OpenMP threads as
there are free cores (at least one) with ``OMP_WAIT_POLICY=PASSIVE``; on an idle machine it changes nothing. A
user's own ``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` always wins. ``BKSDM_OMP_WAIT`` chooses: ``auto``,
``active`` (never change anything) or ``passive`` (always sleep-waiting threads, all cores). Contention that starts
after bksdm has started is not seen (OpenMP reads its settings once, when torch loads it).

:func:`apply_cpu_defaults` runs first thing in the ``bksdm`` command (``bksdm.cli``), before anything imports
torch. Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping

WAIT_VARIABLE = "BKSDM_OMP_WAIT"
"""``auto`` (default), ``active`` (OpenMP's own default: waiting threads spin) or ``passive`` (they sleep)."""

WAIT_POLICIES = ("auto", "active", "passive")
SAMPLE_S = 0.1
"""How long :func:`busy_cores_elsewhere` watches the machine."""


def _cpu_jiffies() -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs from ``/proc/stat``; None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float | None:
    """How many of the machine's cores other processes kept busy over ``sample_s`` (this process sleeps meanwhile).

    Returns None where ``/proc/stat`` cannot be read (not Linux).
    """
    first = _cpu_jiffies()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_jiffies()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (1 - idle / total) * (os.cpu_count() or 1)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_thread_settings(
    environ: MutableMapping[str, str] | None = None,
    busy: Callable[[], float | None] = busy_cores_elsewhere,
    cores: int | None = None,
) -> dict[str, str]:
    """The OpenMP environment variables bksdm sets, given the environment (nothing the user set is changed).

    Args:
        environ: The environment (default ``os.environ``).
        busy: Measures the cores other processes keep busy (called only when ``auto`` has to decide).
        cores: The cores this process may use (default :func:`available_cores`).

    Raises:
        ValueError: ``BKSDM_OMP_WAIT`` is none of ``auto``, ``active``, ``passive``.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get(WAIT_VARIABLE, "auto").strip().lower()
    if wanted not in WAIT_POLICIES:
        raise ValueError(f"{WAIT_VARIABLE}={environ[WAIT_VARIABLE]!r}: use one of {', '.join(WAIT_POLICIES)}")
    if wanted == "active" or "OMP_WAIT_POLICY" in environ:
        return {}
    if wanted == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if "OMP_NUM_THREADS" in environ:
        return {}
    cores = cores or available_cores()
    elsewhere = busy()
    if elsewhere is None or cores - elsewhere >= cores - 0.5:  # idle enough: every thread gets its core
        return {}
    free = max(1, int(cores - elsewhere + 0.5))
    return {"OMP_NUM_THREADS": str(min(free, cores)), "OMP_WAIT_POLICY": "PASSIVE"}


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None, **kwargs) -> dict[str, str]:
    """Sets :func:`cpu_thread_settings` in ``environ`` (default ``os.environ``; child processes inherit them).

    Returns:
        What was set (empty when nothing needed changing or the user's own settings stand).
    """
    environ = os.environ if environ is None else environ
    settings = cpu_thread_settings(environ, **kwargs)
    environ.update(settings)
    return settings
