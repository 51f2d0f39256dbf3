"""The output directory of a demo command: every finished run on disk, at once.

Layout of ``--out``::

  settings.json           what the runs depend on (the experiment, its settings,
                          the seeds, the dataset): written when the first run starts
  runs/<config>-seed<s>.json
                          one finished run each, written the moment it finishes
  results.json, table.md, *.png
                          the report, written when every run is on disk

Every file is written to a temporary file in the same directory, flushed to disk
and renamed over its target (``os.replace``, atomic on POSIX and Windows), so a
command killed at any moment leaves each file whole or absent: only the runs in
flight are lost. Running the same command again finds the finished runs and trains
only the others; a command whose settings differ is refused (``SettingsMismatch``)
unless it starts over (``fresh=True``).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

SETTINGS_FILE = "settings.json"
RUNS_DIR = "runs"
REPORT_FILE = "results.json"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` whole or not at all: ``write(f)`` into a temp file, renamed.

    The temporary file sits next to ``path`` (a rename is atomic only within one
    file system) and is removed if ``write`` fails; the directory is created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """``atomic_write`` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, value: Any) -> None:
    """``atomic_write`` of ``value`` as indented JSON."""
    write_text(path, json.dumps(value, indent=1) + "\n")


def read_json(path: Path) -> Any:
    """Reads a JSON file; ``ValueError`` naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def _normalize(value: Any) -> Any:
    """As JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


class SettingsMismatch(ValueError):
    """The output directory holds runs made with other settings.

    Attributes:
      differences: ``(name, stored, requested)`` for each setting that differs, in
        the order of the requested settings (names missing on one side are None).
    """

    def __init__(self, out: Path, differences: Sequence[tuple[str, Any, Any]]):
        self.out = out
        self.differences = tuple(differences)
        listed = ", ".join(
            f"{n} {new!r} (stored: {old!r})" for n, old, new in differences
        )
        super().__init__(f"{out} holds runs made with other settings: {listed}")


class RunStore:
    """The finished runs of one command in ``out`` (see the module docstring).

    ``RunStore(out, settings, fresh)`` only reads: it creates ``out``, checks that
    a file can be written there and reads the stored settings and the finished
    runs; ``check()`` compares the settings. Nothing is written or removed until
    ``start()``, so a command refused later (a bad flag, a dataset too small)
    changes nothing on disk.

    Args:
      out: the output directory (created if missing).
      settings: a JSON-able dict of everything the runs depend on.
      fresh: start over: ignore (and at ``start()`` remove) the stored runs, the
        stored settings and the old report.

    Raises:
      OSError: ``out`` cannot be created or written to.
      ValueError: a stored file is not valid JSON, or runs are there without
        their settings.
    """

    def __init__(self, out: Path, settings: Mapping[str, Any], *, fresh: bool = False):
        self.out = Path(out)
        self.settings = _normalize(dict(settings))
        self.fresh = fresh
        self.out.mkdir(parents=True, exist_ok=True)
        probe = self.out / f".write-test.{os.getpid()}.{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
        self._stored: dict[str, Any] | None = None
        self._finished: dict[str, dict[str, Any]] = {}
        if fresh:
            return
        path = self.out / SETTINGS_FILE
        runs = sorted(self.runs_dir.glob("*.json"))
        if path.exists():
            self._stored = read_json(path)
        elif runs:
            raise ValueError(
                f"{self.runs_dir} holds runs but {path} is missing: their settings "
                "are unknown"
            )
        for run in runs:
            self._finished[run.stem] = read_json(run)

    @property
    def runs_dir(self) -> Path:
        return self.out / RUNS_DIR

    def check(self) -> None:
        """Raises ``SettingsMismatch`` if ``out`` holds runs of other settings."""
        stored = self._stored
        if stored is None:  # nothing there yet, or fresh
            return
        names = list(self.settings) + [k for k in stored if k not in self.settings]
        differences = [
            (name, stored.get(name), self.settings.get(name))
            for name in names
            if stored.get(name) != self.settings.get(name)
        ]
        if differences:
            raise SettingsMismatch(self.out, differences)

    def finished(self) -> dict[str, dict[str, Any]]:
        """The runs already on disk, by key (empty when ``fresh``)."""
        return dict(self._finished)

    def start(self) -> None:
        """Before the first run: clears the old runs if ``fresh``, writes settings."""
        if self.fresh:
            for path in self.runs_dir.glob("*.json"):
                path.unlink()
            (self.out / REPORT_FILE).unlink(missing_ok=True)
        for stale in self.runs_dir.glob(".*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        write_json(self.out / SETTINGS_FILE, self.settings)

    def save(self, key: str, result: Mapping[str, Any]) -> Path:
        """Writes one finished run, atomically; returns its file."""
        path = self.runs_dir / f"{key}.json"
        write_json(path, dict(result))
        self._finished[key] = _normalize(dict(result))
        return path
