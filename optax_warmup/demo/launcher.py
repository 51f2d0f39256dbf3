"""``--processes N``: N jax.distributed workers of the demo on this machine.

``launch`` starts N copies of the command, each with ``--coordinator
127.0.0.1:PORT --num-processes N --process-id I`` (a free port), in their own
session so that Ctrl-C reaches the launcher alone. Worker 0's output is the
command's (its stdout, its stderr with the progress bar); the others' stdout is
discarded and their stderr kept. Worker 0's stdout passes through the launcher,
which drops gloo's own line on connecting (``[Gloo] Rank 0 is connected to 1 peer
ranks. Expected number of connected peer ranks is : 1``, written by jaxlib's C++
to stdout with no setting to turn it off); a gloo line that reports a missing
peer passes.

Faults: the launcher polls its workers every ``POLL_SECONDS``; when one exits with
an error (or is killed), the others get ``SETTLE_SECONDS`` to exit by themselves,
then SIGTERM, then SIGKILL after ``GRACE_SECONDS`` (a worker blocked in a
collective cannot run its signal handler), so the launcher returns within about 5
seconds with that worker's status, naming it and showing the tail of its error
output. A flag error (status 2) is agreed by every worker and printed once, by
worker 0. ``KeyboardInterrupt`` (SIGINT) or ``SystemExit`` (SIGTERM, through the
entry point's handler) in the launcher ends every worker the same way; a worker
whose launcher was killed outright (SIGKILL) exits by itself within a second
(``exit_with_launcher``).

No side effects on import; ``__main__`` calls ``launch`` and, in a worker,
``exit_with_launcher``.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from optax_warmup.demo.distributed import free_port

POLL_SECONDS = 0.1
SETTLE_SECONDS = 1.0
GRACE_SECONDS = 3.0
TAIL_LINES = 20
LAUNCHER_PID = "OPTAX_WARMUP_LAUNCHER_PID"  # set in the workers of ``launch``


def exit_with_launcher() -> None:
    """In a worker of ``launch``: exit (status 1) within a second of the launcher's
    death, even if the launcher was killed with SIGKILL (a side effect)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# gloo's line when a process has connected to every peer (gloo/transport/tcp/
# context.cc, printConnectivityInfo): expected, so noise to a user.
_GLOO_CONNECTED = re.compile(
    rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
    rb"Expected number of connected peer ranks is : \1\r?"
)
_GLOO = b"[Gloo] "


class _Stdout:
    """Copies a worker's stdout to ours, line by line, without gloo's line on
    connecting (``_GLOO_CONNECTED``). Text that cannot begin such a line is
    copied at once, so a prompt without a newline is not held back."""

    def __init__(self, stream: IO[bytes]):
        self._thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self._thread.start()

    @staticmethod
    def _copy(stream: IO[bytes]) -> None:
        pending = b""
        while chunk := os.read(stream.fileno(), 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [
                line + b"\n" for line in lines if not _GLOO_CONNECTED.fullmatch(line)
            ]
            if not _GLOO.startswith(pending[: len(_GLOO)]):
                kept.append(pending)
                pending = b""
            _write_stdout(b"".join(kept))
        if not _GLOO_CONNECTED.fullmatch(pending):
            _write_stdout(pending)

    def close(self) -> None:
        """Waits (at most 2 s) for the copy to reach the end of the stream."""
        self._thread.join(2.0)


def _write_stdout(data: bytes) -> None:
    if not data:
        return
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except (OSError, ValueError):  # ours is closed: drain the worker's all the same
        pass


class _Tail:
    """Copies a worker's stderr to ours (raw: a progress bar keeps its \\r) and
    keeps its last lines."""

    def __init__(self, stream: IO[bytes], echo: bool):
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""
        self._thread = threading.Thread(
            target=self._copy, args=(stream, echo), daemon=True
        )
        self._thread.start()

    def _copy(self, stream: IO[bytes], echo: bool) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            *done, self._partial = (self._partial + chunk).split(b"\n")
            self.lines.extend(
                line.decode(errors="replace").rsplit("\r", 1)[-1] for line in done
            )

    def close(self) -> None:
        """Waits (at most 2 s) for the copy to reach the end of the stream."""
        self._thread.join(2.0)

    def text(self) -> str:
        self.close()
        rest = self._partial.decode(errors="replace").rsplit("\r", 1)[-1]
        return "\n".join([*self.lines, *([rest] if rest.strip() else [])])


def worker_command(argv: Sequence[str], port: int, n: int, i: int) -> list[str]:
    """The command line of worker ``i`` of ``n`` started by ``launch``."""
    return [
        sys.executable,
        "-m",
        "optax_warmup.demo",
        *argv,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n),
        "--process-id",
        str(i),
    ]


def _stop_all(workers: Sequence[subprocess.Popen], settle: float = 0.0) -> None:
    """Ends every worker: ``settle`` seconds to exit by itself, then SIGTERM,
    then SIGKILL after ``GRACE_SECONDS``."""
    deadline = time.monotonic() + settle
    for w in workers:
        try:
            w.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for w in workers:
        try:
            w.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
    for w in workers:
        w.wait()


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(
    argv: Sequence[str], processes: int, *, env: Mapping[str, str] | None = None
) -> int:
    """Runs ``argv`` as ``processes`` jax.distributed workers on this machine.

    Worker 0's output is ours (its stdout without gloo's line on connecting, and
    its stderr with the progress bar); the others' stdout is discarded and their
    stderr kept for the report of a failure. Returns 0 when every worker
    succeeded, else the status of the first worker to fail (128 + the signal for a
    killed one), after ending the others and printing which worker failed with the
    tail of its stderr.
    ``KeyboardInterrupt`` and ``SystemExit`` here end every worker, then
    propagate.
    """
    port = free_port()
    environ = {
        **os.environ,
        **(env or {}),
        LAUNCHER_PID: str(os.getpid()),
        # Worker 0's stdout is a pipe to us: unbuffered, its lines come as printed.
        "PYTHONUNBUFFERED": "1",
    }
    workers: list[subprocess.Popen] = []
    tails: list[_Tail] = []
    stdout: _Stdout | None = None
    try:
        for i in range(processes):
            w = subprocess.Popen(
                worker_command(argv, port, processes, i),
                env=environ,
                stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C reaches the launcher only
            )
            workers.append(w)
            assert w.stderr is not None
            tails.append(_Tail(w.stderr, echo=i == 0))
            if i == 0:
                assert w.stdout is not None
                stdout = _Stdout(w.stdout)
        while True:
            codes = [w.poll() for w in workers]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                code = codes[i]
                assert code is not None
                _stop_all(workers, settle=SETTLE_SECONDS)
                if workers[0].returncode == 2:  # a flag error, agreed by all
                    return 2  # worker 0 printed it
                sys.stderr.write(
                    f"\npython -m optax_warmup.demo: worker {i} of {processes} "
                    f"(pid {workers[i].pid}) {_status(code)}; "
                    "the other workers were stopped. The end of its error output:\n"
                    + "\n".join("  | " + line for line in tails[i].text().splitlines())
                    + "\n"
                )
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_SECONDS)
    except BaseException:
        _stop_all(workers)
        raise
    finally:
        if stdout is not None:
            stdout.close()
            assert workers[0].stdout is not None
            workers[0].stdout.close()
        for w, tail in zip(workers, tails, strict=False):
            tail.close()
            if w.stderr is not None:
                w.stderr.close()
