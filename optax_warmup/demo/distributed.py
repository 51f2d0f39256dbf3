"""The demo across processes: ``jax.distributed``, its launcher and its checks.

JAX's multi-controller runtime runs one process per host; every process calls
``jax.distributed.initialize`` and then runs the same jitted program over one global
``jax.sharding.Mesh`` of all the processes' devices. The demo runs that way in three
ways:

- ``--processes N``: this machine starts N worker processes (``launcher``), the
  coordinator on ``127.0.0.1`` at a free port, CPU collectives over gloo;
- ``--coordinator HOST:PORT --num-processes N --process-id I``: one process of a
  cluster that someone else started (each host runs the same command but its id);
- ``--distributed``: ``jax.distributed.initialize()`` reads the cluster from the
  environment (SLURM, Open MPI, Cloud TPU).

What holds across processes: the numbers of the recipe are global (the batch of the
linear scaling rule and of ``steps_per_epoch`` is the global batch); each process
puts only its rows of every global batch on its devices (``process_rows``); a ghost
BatchNorm group never straddles two processes (``check_groups``); process 0 alone
writes files and draws the progress bar. Every process checks that the others were
started with the same settings (``differences``), and a flag error on any process
stops them all (``allgather_json``).

Faults: ``launcher`` ends every worker when one fails or on Ctrl-C. Before
``jax.distributed.initialize`` (whose own failures abort the process from C++, or
wait out its own timeout), ``connect`` checks that process 0 can listen on the
coordinator's port and that the others reach it within ``timeout`` seconds.

This module has no side effects on import; ``__main__`` calls ``connect``.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677 (section 2.3: BatchNorm statistics per worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from optax_warmup.demo.experiment import FlagError

DEFAULT_TIMEOUT = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of running across processes."""
    a = parser.add_argument_group(
        "across processes (jax.distributed; see the guide 'Running on several "
        "machines')"
    ).add_argument
    a(
        "--processes",
        type=int,
        default=None,
        help="start this many jax.distributed processes on this machine, which "
        "together run every configuration over one global mesh",
    )
    a(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="this process is one of a cluster: process 0's address (with "
        "--num-processes and --process-id)",
    )
    a("--num-processes", type=int, default=None, help="processes of the cluster")
    a("--process-id", type=int, default=None, help="this process's id, 0 first")
    a(
        "--distributed",
        action="store_true",
        help="this process is one of a cluster that jax.distributed.initialize() "
        "detects (SLURM, Open MPI, Cloud TPU)",
    )
    a(
        "--coordinator-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the coordinator and the other processes",
    )


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process takes part in a cluster (see the module docstring).

    ``launch`` > 1: this process is a launcher of that many local workers.
    ``join``: this process calls ``jax.distributed.initialize`` (with
    ``coordinator``, ``num_processes`` and ``process_id``, or with none of them to
    detect the cluster).
    """

    launch: int = 0
    join: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: float = DEFAULT_TIMEOUT


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` as ``(host, port)``; ``ValueError`` naming the value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535, got {text!r}")
    return host.strip("[]"), int(port)


def cluster(args: argparse.Namespace) -> Cluster:
    """The ``Cluster`` of parsed flags; ``FlagError`` for a combination that
    cannot work."""
    if args.coordinator_timeout <= 0:
        raise FlagError(
            "--coordinator-timeout", f"must be > 0, got {args.coordinator_timeout}"
        )
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if args.processes is not None and args.processes < 1:
        raise FlagError("--processes", f"must be at least 1, got {args.processes}")
    if any(v is not None for v in explicit):
        if None in explicit:
            missing = [
                f
                for f, v in zip(
                    ("--coordinator", "--num-processes", "--process-id"),
                    explicit,
                    strict=True,
                )
                if v is None
            ]
            raise FlagError(
                missing[0],
                "--coordinator, --num-processes and --process-id go together",
            )
        try:
            parse_address(args.coordinator)
        except ValueError as error:
            raise FlagError("--coordinator", str(error)) from None
        if args.num_processes < 1:
            raise FlagError(
                "--num-processes", f"must be at least 1, got {args.num_processes}"
            )
        if not 0 <= args.process_id < args.num_processes:
            raise FlagError(
                "--process-id",
                f"must be in 0..{args.num_processes - 1}, got {args.process_id}",
            )
        if args.distributed:
            raise FlagError("--distributed", "detects what --coordinator gives")
        if args.processes not in (None, args.num_processes):
            raise FlagError(
                "--processes",
                f"{args.processes} differs from --num-processes {args.num_processes}",
            )
        return Cluster(
            join=True,
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            timeout=args.coordinator_timeout,
        )
    if args.distributed:
        if args.processes is not None:
            raise FlagError(
                "--processes", "starts local processes; --distributed joins a cluster"
            )
        return Cluster(join=True, timeout=args.coordinator_timeout)
    processes = args.processes or 1
    return Cluster(launch=processes if processes > 1 else 0)


# --- in each process of a cluster ---------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host not in ("127.0.0.1", "localhost") else host, port))
        except OSError as error:
            raise FlagError(
                "--coordinator",
                f"process 0 cannot listen on port {port}: "
                f"{error.strerror or error} (another program uses it? choose "
                "another port)",
            ) from None


def _wait_for(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise FlagError(
                    "--coordinator",
                    f"no coordinator answered at {host}:{port} within {timeout:g} s "
                    f"({error.strerror or error}); is process 0 running there?",
                ) from None
            time.sleep(0.2)


def connect(c: Cluster) -> None:
    """``jax.distributed.initialize`` for ``c``, with clear errors (a side effect:
    called by the entry point only).

    CPU collectives go over gloo. With an explicit coordinator, process 0 first
    checks that it can listen on the port and the others that it answers within
    ``c.timeout`` seconds; ``FlagError`` otherwise (``initialize`` itself would
    abort the process or wait out its own timeout).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if c.coordinator is not None:
        host, port = parse_address(c.coordinator)
        if c.process_id == 0:
            _check_port_free(host, port)
        else:
            _wait_for(host, port, c.timeout)
    try:
        jax.distributed.initialize(
            c.coordinator,
            c.num_processes,
            c.process_id,
            initialization_timeout=max(1, int(c.timeout)),
        )
    except (RuntimeError, ValueError) as error:  # JaxRuntimeError is a RuntimeError
        raise FlagError(
            "--coordinator" if c.coordinator else "--distributed",
            f"jax.distributed.initialize failed: {error}",
        ) from None
    _CONNECTED[0] = True


_CONNECTED = [False]


def connected() -> bool:
    """Whether ``connect`` joined this process to a cluster."""
    return _CONNECTED[0]


def allgather_json(value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-able), in the order of the process ids.

    A collective: every process must call it, in the same order. With one process
    it returns ``[value]`` without touching the devices.
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value, default=str))]
    from jax.experimental import multihost_utils

    data = np.frombuffer(
        json.dumps(value, sort_keys=True, default=str).encode(), np.uint8
    )
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [
        json.loads(row[: int(n)].tobytes().decode())
        for row, n in zip(rows, np.ravel(sizes), strict=True)
    ]


def differences(settings: Mapping[str, Any]) -> list[str]:
    """The settings in which another process differs from process 0 (a collective).

    Returns one line per differing setting, e.g. ``"--lr 0.2 on process 1, 0.1 on
    process 0"``; empty when every process has the same ``settings``.
    """
    every = allgather_json(dict(settings))
    first, lines = every[0], []
    for name in sorted(set().union(*every)):
        for i, other in enumerate(every[1:], 1):
            if other.get(name) != first.get(name):
                lines.append(
                    f"--{name.replace('_', '-')} {other.get(name)} on process {i}, "
                    f"{first.get(name)} on process 0"
                )
    return lines


def first_error(error: str | None) -> str | None:
    """The first process's error message, if any process has one (a collective)."""
    for i, message in enumerate(allgather_json(error)):
        if message is not None:
            return message if i == jax.process_index() else f"{message} (process {i})"
    return None


def check_groups(
    batch_size: int, group_size: int, processes: int, *, flag: str
) -> None:
    """``FlagError`` unless ghost BatchNorm groups of ``group_size`` stay inside a
    process when ``batch_size`` is split over ``processes``.

    A batch that is one group (``batch_size == group_size``) is ordinary BatchNorm
    over the global batch, as in one process, and is accepted.
    """
    if batch_size == group_size or processes == 1:
        return
    per_process, rest = divmod(batch_size, processes)
    if rest or per_process % group_size:
        raise FlagError(
            flag,
            f"the batch of {batch_size} over {processes} processes gives "
            f"{batch_size / processes:g} examples per process, not a multiple of "
            f"the ghost BatchNorm group of {group_size}: a group would straddle "
            "two processes",
        )


def process_rows(sharding: Sharding, num_rows: int) -> slice:
    """The rows of a ``(num_rows, ...)`` batch that this process's devices hold
    under ``sharding`` (one contiguous block; the whole batch when replicated)."""
    blocks = set()
    for index in sharding.addressable_devices_indices_map((num_rows,)).values():
        rows = index[0] if index else slice(None)
        blocks.add((rows.start or 0, num_rows if rows.stop is None else rows.stop))
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    covered = sum(b - a for a, b in blocks)
    if covered != stop - start and len(blocks) > 1:
        raise ValueError(f"this process's rows {sorted(blocks)} are not contiguous")
    return slice(start, stop)


def quiet_unless_first() -> bool:
    """On processes other than 0: stdout to /dev/null, Python logs at ERROR.

    A side effect for the entry point. Returns whether this is process 0.
    """
    if jax.process_index() == 0:
        return True
    import logging

    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    os.dup2(devnull, 1)
    os.close(devnull)
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.ERROR)
    return False
