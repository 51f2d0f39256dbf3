"""Runs a list of an experiment's runs on this machine, with a progress bar.

Two ways, chosen by ``workers``:

- ``workers=1``: every run in this process, one after another, each on one mesh
  over all the devices (a GPU or TPU host: every step uses every device).
- ``workers > 1``: that many worker processes (spawned, so no JAX state is
  forked), each with one XLA CPU thread and its own CPU device, take runs from a
  queue: a CPU host trains one run per core.

Either way each finished run is handed to ``on_result`` the moment it finishes, in
this process (the caller writes it to disk), and the bar advances once per epoch.
Worker processes end when this process stops: an exception, ``KeyboardInterrupt``
or ``SystemExit`` here terminates them (and waits for them), and a worker whose
parent was killed (``SIGKILL``) exits by itself within a second.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import jax
from jax.sharding import Mesh

from optax_warmup.demo.experiment import Arrays, Experiment, Result, Run

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
OnResult = Callable[[Run, Result], None]


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core on a CPU host with one device, else 1 (use the devices)."""
    cpu_host = jax.default_backend() == "cpu" and jax.device_count() == 1
    return cpu_count() if cpu_host else 1


def run_all(
    experiment: Experiment,
    settings: Any,
    runs: Sequence[Run],
    data: Arrays,
    *,
    workers: int = 1,
    mesh: Mesh | None = None,
    on_result: OnResult | None = None,
    show_progress: bool = True,
    worker_env: Mapping[str, str] | None = None,
) -> list[Result]:
    """Trains ``runs`` and returns their results, in the order of ``runs``.

    Args:
      experiment: the experiment whose ``train`` each run calls.
      settings: its settings.
      runs: the runs to train.
      data: the arrays every run trains on (sent to a worker with each run, by
        the pool's feeder thread: starting a worker stays quick and this
        process's main thread never blocks on a pipe).
      workers: 1 trains in this process; more starts that many CPU worker
        processes (at most one per run; even a single run goes to a worker, so
        that its numbers do not depend on how many runs were left).
      mesh: the devices of each run with ``workers=1`` (default: all); a worker
        uses its own device.
      on_result: called as ``on_result(run, result)`` in this process as each run
        finishes (in the order they finish).
      show_progress: show a tqdm bar over the epochs.
      worker_env: environment variables of the worker processes (besides one XLA
        thread each); this process's environment is left as it was.
    """
    if not runs:
        return []
    from tqdm.auto import tqdm

    epochs = experiment.epochs(settings)
    bar = tqdm(total=len(runs) * epochs, unit="epoch", disable=not show_progress)
    seen = [0] * len(runs)
    finished: set[int] = set()

    def advance(index: int, error: float) -> None:
        if index in finished:  # a late message from a worker: already counted
            return
        seen[index] += 1
        bar.update(1)
        bar.set_postfix_str(f"{runs[index].config} test error {100 * error:.1f}%")

    def finish(index: int, result: Result) -> None:
        finished.add(index)
        bar.update(epochs - seen[index])  # a diverged run stops early
        if on_result is not None:
            on_result(runs[index], result)

    try:
        if workers <= 1:
            results = []
            for i, run in enumerate(runs):

                def on_epoch(epoch: int, error: float, i: int = i) -> None:
                    advance(i, error)

                result = experiment.train(
                    settings, run, data, mesh=mesh, on_epoch=on_epoch
                )
                finish(i, result)
                results.append(result)
            return results
        return _in_workers(
            experiment,
            settings,
            runs,
            data,
            min(workers, len(runs)),
            dict(worker_env or {}),
            advance,
            finish,
        )
    finally:
        bar.close()


def _in_workers(
    experiment: Experiment,
    settings: Any,
    runs: Sequence[Run],
    data: Arrays,
    workers: int,
    env: dict[str, str],
    advance: Callable[[int, float], None],
    finish: Callable[[int, Result], None],
) -> list[Result]:
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()  # (index, test_error) after each epoch of a run
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
    results: dict[int, Result] = {}
    others = set(multiprocessing.active_children())

    def drain(timeout: float) -> None:
        try:
            advance(*messages.get(timeout=timeout))
        except queue.Empty:
            pass

    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(messages, os.getpid()),
    )
    try:
        with _environ(env):  # the workers start (and inherit it) at submit
            pending: dict[Future, int] = {
                pool.submit(_worker_run, experiment, settings, i, run, data): i
                for i, run in enumerate(runs)
            }
        while pending:
            drain(0.2)
            for future in [f for f in pending if f.done()]:
                index = pending.pop(future)
                results[index] = future.result()  # a worker's error is raised here
                while not messages.empty():  # its last epochs come before it
                    drain(0)
                finish(index, results[index])
        pool.shutdown()
    except BaseException:  # the runs in flight are lost; end their workers
        pool.shutdown(wait=False, cancel_futures=True)
        workers_started = set(multiprocessing.active_children()) - others
        for process in workers_started:
            process.terminate()
        for process in workers_started:
            process.join(5)
        raise
    return [results[i] for i in range(len(runs))]


# --- in a worker process ----------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(messages: Any, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see above
    _WORKER.update(messages=messages)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_run(
    experiment: Experiment, settings: Any, index: int, run: Run, data: Arrays
) -> Result:
    messages = _WORKER["messages"]
    return experiment.train(
        settings,
        run,
        data,
        on_epoch=lambda _, error: messages.put((index, error)),
    )


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Sets environment variables (inherited by processes started inside)."""
    previous = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
