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
after bksdm has started cannot change OpenMP's wait policy (OpenMP reads it once, when torch loads it), but the
thread count can change at any time: :class:`ThreadGovernor` watches the machine during long loops (training steps,
generation batches) and gives torch as many threads as there are cores nobody else is using. One thread never waits
for another, so a job started on an idle machine with spinning threads keeps going when something else starts.

:func:`apply_cpu_defaults` runs first thing in the ``bksdm`` command (``bksdm.cli``), before anything imports
torch. Nothing here imports torch when the module loads (:func:`governed_threads` imports it when called).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, MutableMapping

logger = logging.getLogger(__name__)

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


_SET_HERE: dict[str, str] = {}
"""What :func:`apply_cpu_defaults` set in this process's environment (the thread count it set is not the user's)."""


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None, **kwargs) -> dict[str, str]:
    """Sets :func:`cpu_thread_settings` in ``environ`` (default ``os.environ``; child processes inherit them).

    Returns:
        What was set (empty when nothing needed changing or the user's own settings stand).
    """
    environ = os.environ if environ is None else environ
    settings = cpu_thread_settings(environ, **kwargs)
    environ.update(settings)
    if environ is os.environ:
        _SET_HERE.update(settings)
    return settings


def _own_cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads."""
    return time.process_time()


def threads_may_adapt(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether :class:`ThreadGovernor` may change the thread count: ``BKSDM_OMP_WAIT`` is ``auto`` (the default)
    and the user did not set ``OMP_NUM_THREADS`` (a count bksdm itself set at start may change)."""
    environ = os.environ if environ is None else environ
    if environ.get(WAIT_VARIABLE, "auto").strip().lower() != "auto":
        return False
    return "OMP_NUM_THREADS" not in environ or _SET_HERE.get("OMP_NUM_THREADS") == environ["OMP_NUM_THREADS"]


class ThreadGovernor:
    """Keeps torch's CPU thread count at the number of cores other processes leave free, during a long loop.

    Call :meth:`tick` once per step (a training step, a generation batch): at most every ``interval_s`` seconds it
    reads the machine's CPU use (``/proc/stat``) and this process's own CPU time since the last reading; what is
    left is what other processes used. The count it wants is the cores minus that use, rounded, between 1 and
    ``max_threads``; it changes the count only when two readings in a row want the same new count, so one burst
    of another process does not make it flip. Nothing is read on the other calls (a clock read only).

    Args:
        set_threads: Applies a thread count (``torch.set_num_threads``).
        threads: The count in force now.
        max_threads: The most it gives (the cores this process may use).
        interval_s: Seconds between readings.
        machine: (total, idle) jiffies of all CPUs (default: ``/proc/stat``).
        own: This process's CPU seconds.
        clock: Wall-clock seconds.
    """

    def __init__(
        self,
        set_threads: Callable[[int], None],
        threads: int,
        max_threads: int,
        interval_s: float = 2.0,
        machine: Callable[[], tuple[int, int] | None] = _cpu_jiffies,
        own: Callable[[], float] = _own_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.set_threads, self.threads, self.max_threads = set_threads, threads, max(1, max_threads)
        self.interval_s, self.machine, self.own, self.clock = interval_s, machine, own, clock
        self.cores = os.cpu_count() or 1
        self.changes: list[tuple[float, int]] = []
        """(seconds since the governor started, new count) of every change, for logs and benchmarks."""
        self._start = clock()
        self._last = (self._start, machine(), own())
        self._pending: int | None = None

    def wanted(self, elsewhere: float) -> int:
        """The thread count for ``elsewhere`` cores used by other processes."""
        return min(self.max_threads, max(1, int(self.max_threads - elsewhere + 0.5)))

    def tick(self) -> int:
        """Reads the machine when a reading is due and changes the thread count when it should; the count."""
        now = self.clock()
        if now - self._last[0] < self.interval_s:
            return self.threads
        jiffies, own = self.machine(), self.own()
        (then, before, own_before), self._last = self._last, (now, jiffies, own)
        if jiffies is None or before is None or jiffies[0] <= before[0]:
            return self.threads
        total, idle = jiffies[0] - before[0], jiffies[1] - before[1]
        busy = (1 - idle / total) * self.cores
        mine = (own - own_before) / (now - then)
        want = self.wanted(max(0.0, busy - mine))
        if want == self.threads:
            self._pending = None
        elif want == self._pending:
            logger.info("CPU threads %d -> %d: other processes use %.1f cores", self.threads, want, busy - mine)
            self.set_threads(want)
            self.threads, self._pending = want, None
            self.changes.append((round(now - self._start, 2), want))
        else:
            self._pending = want
        return self.threads

    def step_end_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """:meth:`tick` as a diffusers pipeline's ``callback_on_step_end``: between denoising steps."""
        self.tick()
        return callback_kwargs


@contextlib.contextmanager
def governed_threads(device, interval_s: float = 2.0) -> Iterator[ThreadGovernor | None]:
    """A :class:`ThreadGovernor` of torch's CPU threads for a loop on ``device`` (None where it has nothing to do),
    and the thread count as it was when the loop ends.

    None on another device than the CPU, when the user chose the threads (``OMP_NUM_THREADS``, ``BKSDM_OMP_WAIT``
    other than ``auto``), on a one-core machine, and where ``/proc/stat`` cannot be read. The most threads it gives
    is the count in force when the loop starts (a caller's ``torch.set_num_threads`` is respected), or the cores
    this process may use where bksdm lowered the count at start because the machine was busy.

    Images and weights computed with another thread count can differ in the last bits (the order of a sum
    changes): for bit-identical results across runs, fix the count (``OMP_NUM_THREADS``) or set
    ``BKSDM_OMP_WAIT=active``.
    """
    import torch

    before = torch.get_num_threads()
    most = available_cores() if "OMP_NUM_THREADS" in _SET_HERE else before
    if torch.device(device).type != "cpu" or not threads_may_adapt() or _cpu_jiffies() is None or most < 2:
        yield None
        return
    try:
        yield ThreadGovernor(torch.set_num_threads, before, most, interval_s=interval_s)
    finally:
        torch.set_num_threads(before)
