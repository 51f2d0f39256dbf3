"""The demo's train step across processes (jax.distributed), with real processes.

Several processes on this machine stand in for several hosts: each has one CPU
device, the coordinator listens on 127.0.0.1 and the collectives go over gloo.
Tiny models and few steps keep every test to seconds or tens of seconds; the tests
that start processes carry the ``slow`` marker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from optax_warmup.demo import distributed, launcher
from optax_warmup.demo.__main__ import parse
from optax_warmup.demo.experiment import FlagError

ROOT = Path(__file__).resolve().parents[1]
PROG = (sys.executable, "-m", "optax_warmup.demo")
TIMEOUT = 240  # a hang fails the test instead of the suite
# One compilation cache for every process of this file: each compiles once.
CACHE = Path(tempfile.gettempdir()) / f"optax-warmup-test-distributed-{os.getuid()}"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.pop("XLA_FLAGS", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra)
    return env


# --- the flags (no processes) --------------------------------------------------------


def _cluster(*argv: str) -> distributed.Cluster:
    return distributed.cluster(parse(list(argv))[1])


def test_cluster_flags():
    assert _cluster() == distributed.Cluster()
    assert _cluster("--processes", "1") == distributed.Cluster()
    assert _cluster("--processes", "3").launch == 3
    joined = _cluster(
        "--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "2"
    )
    assert joined.join and joined.coordinator == "10.0.0.1:1234"
    assert (joined.num_processes, joined.process_id, joined.launch) == (4, 2, 0)
    detected = _cluster("--distributed")
    assert detected.join and detected.coordinator is None


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--processes", "0"], "--processes", "at least 1"),
        (["--coordinator", "h:1"], "--num-processes", "go together"),
        (["--num-processes", "2", "--process-id", "0"], "--coordinator", "together"),
        (
            ["--coordinator", "h", "--num-processes", "2", "--process-id", "0"],
            "--coordinator",
            "HOST:PORT",
        ),
        (
            ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id",
            "0..1",
        ),
        (
            ["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
            "--num-processes",
            "at least 1",
        ),
        (["--distributed", "--processes", "2"], "--processes", "joins a cluster"),
        (["--coordinator-timeout", "0"], "--coordinator-timeout", "> 0"),
    ],
)
def test_bad_cluster_flags_name_the_flag(argv, flag, message):
    with pytest.raises(FlagError, match=message) as info:
        _cluster(*argv)
    assert info.value.flag == flag


def test_ghost_groups_must_not_straddle_processes():
    distributed.check_groups(256, 32, 2, flag="--large-batch")  # 128 = 4 groups
    distributed.check_groups(32, 32, 2, flag="--large-batch")  # one group: plain BN
    distributed.check_groups(96, 32, 1, flag="--large-batch")
    with pytest.raises(FlagError, match=r"48 examples per process.*straddle") as info:
        distributed.check_groups(96, 32, 2, flag="--large-batch")
    assert info.value.flag == "--large-batch"
    with pytest.raises(FlagError, match=r"21\.3333 examples per process"):
        distributed.check_groups(64, 32, 3, flag="--large-batch")


def test_parse_address():
    assert distributed.parse_address("node-3:8476") == ("node-3", 8476)
    assert distributed.parse_address("[::1]:80") == ("::1", 80)
    for bad in ("node", "node:", ":80", "node:0", "node:99999", "node:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            distributed.parse_address(bad)


def test_one_process_collectives_are_identities():
    assert distributed.allgather_json({"a": (1, 2)}) == [{"a": [1, 2]}]
    assert distributed.differences({"lr": 0.1}) == []
    assert distributed.first_error(None) is None
    assert distributed.first_error("argument --x: bad") == "argument --x: bad"


def test_worker_command_carries_the_cluster():
    command = launcher.worker_command(["--quick"], 1234, 2, 1)
    assert command[1:4] == ["-m", "optax_warmup.demo", "--quick"]
    assert command[-6:] == [
        "--coordinator",
        "127.0.0.1:1234",
        "--num-processes",
        "2",
        "--process-id",
        "1",
    ]
    args = parse(command[3:])[1]
    assert distributed.cluster(args).process_id == 1


# --- the train step: two processes against one process with two devices -------------

# Trains the demo's train step (training._steps) for 20 steps of a tiny model with
# ghost BatchNorm, on synthetic data; saves (process 0) every leaf of the train
# state, current_lr after every step, the rows this process read, and the test
# errors counted over an odd-sized test set. Modes: "run" (20 steps), "save" (20
# steps, an orbax checkpoint after step 10), "restore" (steps 10..19 from it).
STEP_SCRIPT = """
import json, sys
mode, out, checkpoint, port, n, pid = sys.argv[1:7]
n, pid = int(n), int(pid)
if n > 1:
    from optax_warmup.demo import distributed
    distributed.connect(distributed.Cluster(
        join=True, coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
        timeout=60))
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import optax_warmup as ow
from optax_warmup.demo import training, warmup

STEPS, SAVE_AT, N, TEST = 20, 10, 160, 21
settings = warmup.Settings(small_batch=8, large_batch=32, widths=(4, 8, 8),
                           epochs=4, warmup_epochs=1.0, milestones=(2.0, 3.0))
steps_per_epoch = training.steps_per_epoch(N, settings.large_batch)  # 5
rng = np.random.default_rng(0)
x = rng.normal(size=(N, 40, 1)).astype(np.float32)
y = rng.integers(0, 10, N).astype(np.int32)

class Recorder:  # the rows of the dataset that this process reads
    def __init__(self, a):
        self.a, self.shape, self.read = a, a.shape, set()
    def __getitem__(self, index):
        self.read.update(np.asarray(index).tolist())
        return self.a[index]

model = settings.model(0)
tx = settings.optimizer("gradual_warmup", steps_per_epoch)
model.train()
train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
model.eval()
train_step, errors = training._steps(None, train_def, nnx.graphdef(model), tx, 0.1)
mesh = training.data_mesh()
assert mesh.size == 2 and jax.process_count() == n, (mesh, jax.process_count())
replicated = NamedSharding(mesh, P())
sharded = NamedSharding(mesh, P("data"))
params, stats = training.put_replicated((params, stats), replicated)
opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

import orbax.checkpoint as ocp
checkpointer = ocp.StandardCheckpointer()
start = 0
if mode == "restore":
    state = {"params": params, "stats": stats, "opt_state": opt_state}
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    state = checkpointer.restore(checkpoint, target)
    params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
    start = SAVE_AT
lrs, read = [], []
for t in range(start, STEPS):
    if mode == "save" and t == SAVE_AT:
        checkpointer.save(checkpoint,
                          {"params": params, "stats": stats, "opt_state": opt_state})
        checkpointer.wait_until_finished()
    idx = np.random.default_rng(100 + t).permutation(N)[: settings.large_batch]
    xs, ys = Recorder(x), Recorder(y)
    bx, by = training.put_batch((xs, ys), idx, sharded)
    assert xs.read == ys.read
    read.append(sorted(xs.read))
    local = np.concatenate([np.asarray(s.data) for s in bx.addressable_shards])
    np.testing.assert_array_equal(local, x[sorted(xs.read, key=list(idx).index)])
    params, stats, opt_state, loss, err = train_step(params, stats, opt_state, bx, by)
    lrs.append(float(ow.current_lr(opt_state)))
wrong, counted = errors(params, stats, *training.put_test_set(x[:TEST], y[:TEST],
                                                             sharded))
leaves = jax.tree.leaves((params, stats, opt_state))
counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if "count" in jax.tree_util.keystr(path)]
np.savez(f"{out}-{pid}.npz", lrs=np.asarray(lrs), wrong=int(wrong),
         counted=int(counted), count=max(counts),
         **{f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
with open(f"{out}-{pid}.json", "w") as f:
    json.dump(read, f)
"""


def _run_script(mode: str, out: Path, processes: int, checkpoint: Path | None = None):
    """Runs STEP_SCRIPT in ``processes`` processes (one device each) or, with 1,
    in one process with two devices; returns process 0's arrays."""
    port = distributed.free_port()
    env = _env()
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(STEP_SCRIPT),
                mode,
                str(out),
                str(checkpoint),
                str(port),
                str(processes),
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(processes)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-4000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    with np.load(f"{out}-0.npz") as result:
        return dict(result)


def _leaves(result) -> list[np.ndarray]:
    names = sorted(
        (k for k in result if k.startswith("leaf")), key=lambda k: int(k[4:])
    )
    return [result[k] for k in names]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    out = tmp / "run"
    result = _run_script("save", out, 2, tmp / "checkpoint")
    return result, out, tmp / "checkpoint"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(two_processes, tmp_path):
    """Bit-identical, the tightest tolerance: both runs compile the same program
    partitioned over two devices, and the only cross-device sums (the gradients'
    and the BatchNorm statistics' all-reduce, the error counts) add two numbers,
    which floating point adds the same in either order; gloo or the in-process
    collective changes where the sum runs, not its value."""
    two, _, _ = two_processes
    one = _run_script("run", tmp_path / "one", 1)
    assert len(_leaves(two)) == len(_leaves(one)) > 10  # params, stats, opt state
    for a, b in zip(_leaves(two), _leaves(one), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(two["lrs"], one["lrs"])  # every step
    lrs = two["lrs"]
    assert len(lrs) == 20 and lrs[0] < lrs[5] == lrs.max() > lrs[-1]  # warmup, decay
    assert int(two["count"]) == 20
    # Each of the 21 test examples is counted once (the mesh pads to 22).
    assert int(two["counted"]) == int(one["counted"]) == 21
    assert int(two["wrong"]) == int(one["wrong"])


@pytest.mark.slow
def test_each_process_reads_only_its_half_of_every_batch(two_processes):
    _, out, _ = two_processes
    first = json.loads(Path(f"{out}-0.json").read_text())
    second = json.loads(Path(f"{out}-1.json").read_text())
    assert len(first) == len(second) == 20
    for t, (a, b) in enumerate(zip(first, second, strict=True)):
        idx = np.random.default_rng(100 + t).permutation(160)[:32]
        assert sorted(a) == sorted(idx[:16].tolist())  # process 0: rows 0..15
        assert sorted(b) == sorted(idx[16:].tolist())  # process 1: rows 16..31


@pytest.mark.slow
def test_orbax_checkpoint_of_two_processes_resumes_bit_identically(
    two_processes, tmp_path
):
    uninterrupted, _, checkpoint = two_processes
    assert (checkpoint / "_CHECKPOINT_METADATA").exists() or any(checkpoint.iterdir())
    resumed = _run_script("restore", tmp_path / "resumed", 2, checkpoint)
    for a, b in zip(_leaves(uninterrupted), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(uninterrupted["lrs"][10:], resumed["lrs"])
    assert int(resumed["count"]) == 20  # the schedule's count came back


# --- the command line across processes --------------------------------------------

TINY = [
    "--samples", "400", "--epochs", "2", "--milestones", "1", "--warmup-epochs",
    "0.5", "--small-batch", "8", "--large-batch", "32", "--widths", "4,4,4",
    "--seeds", "1", "--no-progress",
]  # fmt: skip


def _demo(argv, tmp_path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PROG, *argv, "--cache-dir", str(tmp_path / "cache")],
        env=_env(**kwargs.pop("env", {})),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        **kwargs,
    )


@pytest.mark.slow
def test_demo_over_two_processes_gives_the_table_of_one(tmp_path):
    two = _demo([*TINY, "--processes", "2", "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    one = _demo(
        [*TINY, "--workers", "1", "--out", "one"],
        tmp_path,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert (tmp_path / "two/table.md").read_text() == (
        tmp_path / "one/table.md"
    ).read_text()
    report = json.loads((tmp_path / "two/results.json").read_text())
    reference = json.loads((tmp_path / "one/results.json").read_text())
    assert report["environment"]["processes"] == 2
    assert report["environment"]["devices"] == 2
    for a, b in zip(report["runs"], reference["runs"], strict=True):
        for key in ("train_loss", "train_error", "test_error", "lr"):
            assert a[key] == b[key], (a["config"], key)
        # The recipe's numbers are global: the batch and the steps per epoch.
        assert a["steps_per_epoch"] == 320 // a["batch_size"]
    # Only process 0 wrote: one set of files, one table printed.
    assert two.stdout.count("| configuration |") == 1
    assert "Traceback" not in two.stderr
    assert "[Gloo]" not in two.stdout + two.stderr  # gloo's line on connecting
    # The same command resumes: process 0 reads --out, the others train the same
    # remaining run.
    (tmp_path / "two/runs/gradual_warmup-seed0.json").unlink()
    again = _demo([*TINY, "--processes", "2", "--out", "two"], tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "skipping the 3 of 4 runs already finished there; 1 to train" in again.stdout
    assert (tmp_path / "two/table.md").read_text() == (
        tmp_path / "one/table.md"
    ).read_text()


@pytest.mark.slow
def test_a_group_that_straddles_processes_is_one_flag_error(tmp_path):
    done = _demo(
        [*TINY, "--large-batch", "24", "--processes", "2", "--out", "o"], tmp_path
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("python -m optax_warmup.demo: error: argument ")
    assert "--large-batch" in lines[-1] and "straddle" in lines[-1]
    assert sum("error:" in line for line in lines) == 1  # printed once
    assert not (tmp_path / "o" / "settings.json").exists()


def _explicit(port: int, n: int, i: int, *extra: str) -> list[str]:
    return [
        *TINY,
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
        "--process-id", str(i), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_workers_with_different_settings_are_refused(tmp_path):
    port = distributed.free_port()
    procs = [
        subprocess.Popen(
            [*PROG, *_explicit(port, 2, i, "--lr", lr, "--out", f"o{i}"),
             "--cache-dir", str(tmp_path / "cache")],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for i, lr in enumerate(("0.1", "0.2"))
    ]  # fmt: skip
    try:
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "different settings: --lr 0.2 on process 1, 0.1 on process 0" in err
    assert "Traceback" not in "".join(errors)


@pytest.mark.slow
def test_a_coordinator_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _demo([*_explicit(port, 2, 0), "--out", "o"], tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "argument --coordinator: process 0 cannot listen on port" in last


@pytest.mark.slow
def test_a_coordinator_that_never_comes_up_is_a_clear_error(tmp_path):
    port = distributed.free_port()  # nothing listens there
    done = _demo(
        [*_explicit(port, 2, 1, "--coordinator-timeout", "2"), "--out", "o"], tmp_path
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert f"no coordinator answered at 127.0.0.1:{port} within 2 s" in last


def _processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if status != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _workers(marker: str, launcher_pid: int) -> list[int]:
    return [p for p in _processes_with(marker) if p != launcher_pid]


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _start_launcher(tmp_path: Path, marker: str) -> subprocess.Popen:
    # Enough epochs that the workers are still training when the test acts.
    argv = [*TINY, "--epochs", "40", "--milestones", "20", "--processes", "2"]
    return subprocess.Popen(
        [*PROG, *argv, "--out", "o", "--cache-dir", str(tmp_path / "cache")],
        env=_env(TEST_MARKER=marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_a_killed_worker_stops_the_launcher_and_the_others(tmp_path):
    marker = f"demo-test-{uuid.uuid4().hex}"
    proc = _start_launcher(tmp_path, marker)
    try:
        # settings.json is written just before the first run trains.
        _wait_for(lambda: (tmp_path / "o/settings.json").exists(), 120, "training")
        workers = _workers(marker, proc.pid)
        assert len(workers) == 2
        victim = max(workers)  # started second: worker 1
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 128 + signal.SIGKILL
    assert f"worker 1 of 2 (pid {victim}) was killed by SIGKILL" in err
    assert "the other workers were stopped" in err
    assert _workers(marker, proc.pid) == []
    print(f"launcher exited {elapsed:.1f} s after the kill")


@pytest.mark.slow
def test_a_worker_error_is_named_with_the_tail_of_its_output(tmp_path):
    # Worker 0 trains the first run, then cannot write it: runs/ is a file.
    (tmp_path / "o").mkdir()
    (tmp_path / "o/runs").write_text("not a directory")
    done = _demo([*TINY, "--processes", "2", "--out", "o"], tmp_path)
    assert done.returncode == 1
    assert "worker 0 of 2" in done.stderr and "exited with status 1" in done.stderr
    tail = done.stderr.split("The end of its error output:")[1]
    assert "  | " in tail and "Error" in tail  # its traceback's last lines


@pytest.mark.slow
def test_sigint_to_the_launcher_ends_every_worker(tmp_path):
    marker = f"demo-test-{uuid.uuid4().hex}"
    proc = _start_launcher(tmp_path, marker)
    try:
        _wait_for(lambda: (tmp_path / "o/settings.json").exists(), 120, "training")
        assert len(_workers(marker, proc.pid)) == 2
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 130
    assert _workers(marker, proc.pid) == []


# Writes, on stdout, our lines around gloo's line on connecting (split over two
# writes, as a pipe may deliver it), a gloo line that reports a missing peer, and a
# last line without a newline; worker 1 the same, which the launcher discards.
GLOO_WORKER = r"""
import sys, time
i = sys.argv[1]
def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()
    time.sleep(0.05)
write("ours: before\n[Gloo] Rank " + i + " is conn")
write("ected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
write("[Gloo] Rank " + i + " is connected to 0 peer ranks. "
      "Expected number of connected peer ranks is : 1\n")
write("ours: after, no newline")
"""


def test_the_launcher_passes_worker_0s_stdout_without_gloos_line(monkeypatch, capfd):
    # jaxlib's gloo writes "[Gloo] Rank 0 is connected to 1 peer ranks. ..." to
    # stdout from C++ on connecting, with no setting to turn it off.
    monkeypatch.setattr(
        launcher,
        "worker_command",
        lambda argv, port, n, i: [sys.executable, "-c", GLOO_WORKER, str(i)],
    )
    assert launcher.launch([], 2) == 0
    out, _ = capfd.readouterr()
    assert out == (
        "ours: before\n"
        "[Gloo] Rank 0 is connected to 0 peer ranks. "
        "Expected number of connected peer ranks is : 1\n"
        "ours: after, no newline"
    )


def test_launcher_status_of_a_killed_worker():
    assert launcher._status(-9) == "was killed by SIGKILL"
    assert launcher._status(3) == "exited with status 3"


def test_namespace_flags_shared_by_the_processes():
    from optax_warmup.demo.__main__ import _shared_flags

    args = argparse.Namespace(lr=0.1, out=Path("a"), process_id=1, cache_dir=None)
    assert _shared_flags(args) == {"lr": 0.1}
