"""CPU threading that survives other work on the machine, set before torch loads.

PyTorch's CPU kernels run on OpenMP threads (GNU libgomp in the Linux wheels) that spin while they wait for each
other. When another process takes a core, every parallel region waits for the descheduled thread and throughput
collapses: on the 2-core machine with one busy process beside it, ``bksdm generate`` on the bundled teacher took
170 s with the default threads against 26 s with ``OMP_WAIT_POLICY=PASSIVE`` (issue 15; side-by-side figures:
``benchmarks/cpu_contention.py``). PASSIVE makes waiting threads sleep instead of spinning.

OpenMP reads its settings once, when torch loads it, so :func:`apply_cpu_defaults` runs first thing in the ``bksdm``
command (``bksdm.cli``), before anything imports torch. A user's own ``OMP_WAIT_POLICY`` always wins;
``BKSDM_OMP_WAIT=active`` keeps OpenMP's spinning default (the fastest on a machine nothing else uses). Nothing here
imports torch.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_VARIABLE = "BKSDM_OMP_WAIT"
"""``passive`` (default: waiting OpenMP threads sleep) or ``active`` (OpenMP's own default: they spin)."""

WAIT_POLICIES = ("passive", "active")


def cpu_thread_settings(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables bksdm sets for OpenMP, given the current environment (nothing the user set).

    Raises:
        ValueError: ``BKSDM_OMP_WAIT`` is neither ``passive`` nor ``active``.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get(WAIT_VARIABLE, "passive").strip().lower()
    if wanted not in WAIT_POLICIES:
        raise ValueError(f"{WAIT_VARIABLE}={environ[WAIT_VARIABLE]!r}: use one of {', '.join(WAIT_POLICIES)}")
    if "OMP_WAIT_POLICY" in environ or wanted == "active":
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Sets :func:`cpu_thread_settings` in ``environ`` (default ``os.environ``; child processes inherit them).

    Returns:
        What was set (empty when the user's own settings stand).
    """
    environ = os.environ if environ is None else environ
    settings = cpu_thread_settings(environ)
    environ.update(settings)
    return settings
