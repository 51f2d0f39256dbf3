"""What an experiment of ``python -m optax_warmup.demo`` is: one definition.

An experiment is an ``Experiment`` value (``warmup.EXPERIMENT``) that names its
parts, each a plain function of its module, over the parts that every experiment
shares (``data``, ``model``, ``training``, ``store``, ``runner``, ``stats``,
``report``, ``flags``). Its settings are a frozen dataclass of everything its runs
depend on (its defaults are the default run), with ``epochs`` and ``configs()``.
The command line (``__main__``) drives every experiment the same way:

1. parse: ``add_arguments`` adds the experiment's flags (their dests name the
   settings' fields), ``settings(args)`` turns them into its settings (raising
   ``FlagError`` for a bad value);
2. plan: ``runs(settings, seeds)`` lists every (configuration, seed), and
   ``check(settings, data, devices)`` refuses settings that the data or the devices
   cannot take, before any training;
3. run: ``train(settings, run, data, mesh=..., on_epoch=...)`` trains one run on a
   device mesh (the experiment's ``train_run``) and returns its result, a JSON-able
   dict with at least ``config`` and ``seed`` (the runner schedules the runs over
   processes; the store writes each);
4. write: ``summarize`` (the analysis), ``table``, ``notes`` and ``figures`` make
   the report from the results, plain data: the same functions redraw a stored
   ``results.json`` (``--replot``).

Runs are pickled to worker processes, so an experiment, its settings and its runs
must pickle: module-level functions and classes do.

An experiment's module imports the shared modules and never another experiment;
adding one is its module and a line in ``__main__.EXPERIMENTS``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
from jax.sharding import Mesh

Result = dict[str, Any]  # one run's JSON-able result
Summary = dict[str, dict[str, Any]]  # the analysis of the results, JSON-able
Arrays = dict[str, np.ndarray]
OnEpoch = Callable[[int, float], None]  # on_epoch(epoch, test_error)


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


class Settings(Protocol):
    """What the command line reads of an experiment's settings."""

    @property
    def epochs(self) -> int:
        """Epochs of one run (a run that diverges stops sooner): the progress bar."""
        ...

    def configs(self) -> Sequence[str]:
        """Every configuration (a row of the table), in the order of the report."""
        ...


S = TypeVar("S", bound=Settings)
S_contra = TypeVar("S_contra", bound=Settings, contravariant=True)


class TrainRun(Protocol[S_contra]):
    """``train_run(settings, config, seed, data, *, mesh, on_epoch)``."""

    def __call__(
        self,
        settings: S_contra,
        config: str,
        seed: int,
        data: Arrays,
        *,
        mesh: Mesh | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> Result: ...


@dataclasses.dataclass(frozen=True)
class Experiment(Generic[S]):
    """One experiment of the command line: its parts, by name.

    Attributes:
      name: the value of ``--experiment``.
      description: the ``--help`` text.
      quick: flag defaults of ``--quick`` (a run of under a minute).
      anchors: published numbers to compare with, copied into ``results.json``.
      settings_type: the settings' frozen dataclass (its defaults: the default
        run); ``settings_type(**dataclasses.asdict(settings))`` is ``settings``.
      add_arguments: ``add_arguments(parser)`` adds the experiment's flags.
      settings: ``settings(args)``: the settings of parsed flags; ``FlagError``
        for a value that cannot work.
      check: ``check(settings, data, devices)``: ``FlagError`` unless every run
        can train on ``data`` over ``devices``.
      train_run: ``train_run(settings, config, seed, data, *, mesh, on_epoch)``
        trains one run, its batch sharded over ``mesh`` (default: all devices),
        calling ``on_epoch(epoch, test_error)`` after each epoch.
      summarize: ``summarize(results, settings)``: the analysis, JSON-able.
      table: ``table(summary)``: the Markdown of ``table.md``.
      notes: ``notes(summary)``: lines printed under the table.
      figures: ``figures(results, settings, out)`` draws the PNG figures into
        ``out`` and returns their paths.
    """

    name: str
    description: str
    quick: Mapping[str, Any]
    anchors: Mapping[str, Any]
    settings_type: Callable[..., S]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace], S]
    check: Callable[[S, Arrays, int], None]
    train_run: TrainRun[S]
    summarize: Callable[[Sequence[Result], S], Summary]
    table: Callable[[Summary], str]
    notes: Callable[[Summary], list[str]]
    figures: Callable[[Sequence[Result], S, Path], list[Path]]

    def load_settings(self, stored: Mapping[str, Any]) -> S:
        """The settings back from their JSON form (``dataclasses.asdict``)."""
        return self.settings_type(**stored)

    def runs(self, settings: S, seeds: Sequence[int]) -> list[Run]:
        """Every run, seed by seed, each seed's in the order of the report."""
        return [Run(config, seed) for seed in seeds for config in settings.configs()]

    def epochs(self, settings: S) -> int:
        """Epochs of one run: the progress bar's unit."""
        return settings.epochs

    def train(
        self,
        settings: S,
        run: Run,
        data: Arrays,
        *,
        mesh: Mesh | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> Result:
        """Trains ``run`` with ``train_run``."""
        return self.train_run(
            settings, run.config, run.seed, data, mesh=mesh, on_epoch=on_epoch
        )
