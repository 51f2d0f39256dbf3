"""What an experiment of ``python -m optax_warmup.demo`` implements.

An experiment is a stateless object (``warmup.EXPERIMENT``) whose methods take
its settings, a frozen dataclass of everything its runs depend on. The command line
(``__main__``) drives every experiment the same way:

1. parse: ``add_arguments`` adds the experiment's flags, ``settings(args)`` turns
   them into its settings (raising ``FlagError`` for a bad value);
2. plan: ``runs(settings, seeds)`` lists the runs, ``check(settings, data,
   devices)`` refuses settings that the data or the devices cannot take, before any
   training;
3. run: ``train(settings, run, data, mesh=..., on_epoch=...)`` trains one run on a
   device mesh and returns its result, a JSON-able dict with at least ``config`` and
   ``seed`` (the runner schedules the runs over processes; the store writes each);
4. write: ``summarize``, ``table``, ``notes`` and ``figures`` make the report.

Runs are pickled to worker processes, so the experiment object, its settings and
its runs must pickle (module-level classes do).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
from jax.sharding import Mesh

Result = dict[str, Any]  # one run's JSON-able result
Summary = dict[str, dict[str, Any]]  # per configuration
Arrays = dict[str, np.ndarray]
OnEpoch = Callable[[int, float], None]  # on_epoch(epoch, test_error)

SettingsT = TypeVar("SettingsT")


class Run(NamedTuple):
    """One training run: a configuration (a row of the table) and a seed."""

    config: str
    seed: int

    @property
    def key(self) -> str:
        """The run's name on disk, e.g. ``gradual_warmup-seed2``."""
        return f"{self.config}-seed{self.seed}"


class FlagError(ValueError):
    """A command-line value that cannot work; ``__main__`` reports it argparse-style.

    Args:
      flag: the flag to blame, e.g. ``"--milestones"``.
      message: what is wrong with it.
    """

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"argument {flag}: {message}")


class Experiment(Protocol[SettingsT]):
    """The interface of one experiment (see the module docstring)."""

    name: str  # the value of --experiment
    description: str  # the --help text
    quick: Mapping[str, Any]  # flag defaults of --quick (a run of under a minute)
    anchors: Mapping[str, Any]  # published numbers to compare with, for the JSON

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds the experiment's flags; their dests name the settings' fields."""
        ...

    def settings(self, args: argparse.Namespace) -> SettingsT:
        """The settings of parsed flags; ``FlagError`` for a value that cannot work."""
        ...

    def load_settings(self, stored: Mapping[str, Any]) -> SettingsT:
        """The settings back from their JSON form (``dataclasses.asdict``)."""
        ...

    def runs(self, settings: SettingsT, seeds: Sequence[int]) -> list[Run]:
        """Every run of the experiment, in the order of the report."""
        ...

    def check(self, settings: SettingsT, data: Arrays, devices: int) -> None:
        """``FlagError`` unless every run can train on ``data`` over ``devices``."""
        ...

    def epochs(self, settings: SettingsT) -> int:
        """Epochs of one run (a run that diverges stops sooner): the progress bar."""
        ...

    def train(
        self,
        settings: SettingsT,
        run: Run,
        data: Arrays,
        *,
        mesh: Mesh | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> Result:
        """Trains one run, its batch sharded over ``mesh`` (default: all devices)."""
        ...

    def summarize(self, settings: SettingsT, results: Sequence[Result]) -> Summary:
        """Per configuration: the statistics of its runs over seeds."""
        ...

    def table(self, summary: Summary) -> str:
        """The Markdown table of ``table.md``."""
        ...

    def notes(self, summary: Summary) -> list[str]:
        """Lines printed under the table: what its columns mean where it matters."""
        ...

    def figures(
        self, settings: SettingsT, results: Sequence[Result], n_train: int, out: Path
    ) -> list[Path]:
        """Draws the PNG figures into ``out``; returns their paths."""
        ...
