"""The ``slow`` marker: which tests the README's ``pytest`` leaves out, and a check.

``pytest`` (the README's command) runs the tests a contributor waits for: a few minutes
on two cores. ``pytest -m slow`` runs the others, ``pytest -m ""`` all of them, and
``.ci/run`` runs both selections (CONTRIBUTING.md lists the slow tests and why).

Mark a test ``@pytest.mark.slow`` (or a whole module with ``pytestmark =
pytest.mark.slow``) when it

- starts processes: the demo's command line end to end, several jax.distributed
  processes, a fresh interpreter that imports jax;
- trains a whole experiment run, or compiles a large model;
- or otherwise takes more than ``SLOW_SECONDS`` on two cores, its fixtures included.

A slow test is still a test: it asserts as much as any other, and CI runs it. Before
marking a test slow for its time alone, see whether it is slow for no reason: a
module-scoped fixture can share a compiled function or a run between tests, and a
smaller size often checks the same thing.

At the end of a run, the summary lists the tests not marked ``slow`` that took longer
than ``SLOW_SECONDS`` (setup, call and teardown together), so that a new slow test is
seen; it reports, it never fails a run (tests assert no wall-clock times).
"""

from __future__ import annotations

import os

import jax
import pytest

SLOW_SECONDS = 5.0


def _start_xla_without_llvm_optimization() -> None:
    """Starts this process's XLA backend with LLVM's optimization off.

    The tests compile hundreds of small programs and run each a few times, so that
    compiling is most of their time; ``--xla_backend_optimization_level=0`` (LLVM's
    code generation at -O0) halves it. XLA's own passes are the same; the compiled
    code is slower, and may round differently in the last bit where the default
    level fuses a multiply and an add, as it may between CPUs: the tests compare
    with tolerances, or two programs of the same process. XLA reads ``XLA_FLAGS``
    once, when its backend starts: the flag is set for that moment only, so the
    processes that tests start compile as a user's would. A level already in
    ``XLA_FLAGS`` is kept (``--xla_backend_optimization_level=2`` is the default).
    """
    flags = os.environ.get("XLA_FLAGS")
    if flags and "xla_backend_optimization_level" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags or ''} --xla_backend_optimization_level=0"
    try:
        jax.devices()
    finally:
        if flags is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = flags


_start_xla_without_llvm_optimization()

_TOTALS: dict[str, float] = {}
_MARKED: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _TOTALS[report.nodeid] = _TOTALS.get(report.nodeid, 0.0) + report.duration
    if "slow" in report.keywords:
        _MARKED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    del exitstatus, config
    unmarked = sorted(
        ((seconds, nodeid) for nodeid, seconds in _TOTALS.items()),
        reverse=True,
    )
    unmarked = [(s, n) for s, n in unmarked if s > SLOW_SECONDS and n not in _MARKED]
    if not unmarked:
        return
    terminalreporter.section("tests over SLOW_SECONDS not marked slow")
    terminalreporter.line(
        f"{len(unmarked)} took more than {SLOW_SECONDS:g} s; mark them "
        "@pytest.mark.slow or make them cheaper (tests/conftest.py):"
    )
    for seconds, nodeid in unmarked:
        terminalreporter.line(f"{seconds:7.1f} s  {nodeid}")
