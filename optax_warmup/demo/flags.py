"""The flags that every experiment shares, and the checks that name a bad one.

Every experiment trains the same model with Goyal et al.'s recipe from a reference
batch n at rate η: ``add_recipe_arguments`` declares its flags (``--small-batch``,
``--lr``, ``--epochs``, ``--warmup-epochs``, ``--milestones``, ``--weight-decay``,
``--label-smoothing``, ``--widths``) and ``check_recipe_arguments`` checks them.
A flag's dest names the settings field it sets (``settings_fields``). A bad value
is a ``FlagError`` that names the flag, including the library's own refusals
(``library_checks``) and batches that the data or the devices cannot take
(``check_batches``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax

from optax_warmup.demo.distributed import check_groups
from optax_warmup.demo.experiment import FlagError

T = TypeVar("T")

# The library's arguments that the recipe's flags set, by name.
RECIPE_FLAGS = {
    "base_lr": "--lr",
    "learning_rate": "--lr",
    "base_batch_size": "--small-batch",
    "warmup_epochs": "--warmup-epochs",
    "milestones": "--milestones",
    "weight_decay": "--weight-decay",
}


def _split(text: str, kind: Callable[[str], T], what: str) -> tuple[T, ...]:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what}, got {text!r}"
        ) from None


def ints(text: str) -> tuple[int, ...]:
    """``--widths 8,16,32``: comma-separated integers (an argparse ``type``)."""
    return _split(text, int, "integers")


def floats(text: str) -> tuple[float, ...]:
    """``--milestones 10,20``: comma-separated numbers (an argparse ``type``)."""
    return _split(text, float, "numbers")


def shown(values: Sequence[float]) -> str:
    """Numbers as a flag takes them: ``shown((10.0, 20.5))`` is ``10,20.5``."""
    return ",".join(f"{v:g}" for v in values)


def flag_name(dest: str) -> str:
    """The flag of an argparse dest: ``flag_name("small_batch")`` is
    ``--small-batch``."""
    return "--" + dest.replace("_", "-")


def default_milestones(epochs: int) -> tuple[float, ...]:
    """Goyal's decays at epochs 30, 60 and 80 of 90, scaled to ``epochs``.

    >>> default_milestones(90)
    (30.0, 60.0, 80.0)
    >>> default_milestones(30)
    (10.0, 20.0, 27.0)
    """
    return tuple(float(round(epochs * f)) for f in (30 / 90, 60 / 90, 80 / 90))


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """Adds the recipe's flags, defaults from the settings ``defaults``.

    The reference batch n and rate η, the epochs, the warmup and the ×0.1 decays,
    then the model and its loss: ``--weight-decay``, ``--label-smoothing`` and
    ``--widths``.
    """
    a = parser.add_argument_group(
        "the recipe (Goyal et al.'s, from the reference batch n at rate η)"
    ).add_argument
    a(
        "--small-batch",
        type=int,
        default=defaults.small_batch,
        help="n: the reference batch, and the ghost BatchNorm group in every run",
    )
    a("--lr", type=float, default=defaults.lr, help="η: the SGD rate at batch n")
    a("--epochs", type=int, default=defaults.epochs, help="epochs of every run")
    a(
        "--warmup-epochs",
        type=float,
        default=defaults.warmup_epochs,
        help="warmup length in epochs",
    )
    a(
        "--milestones",
        type=floats,
        default=None,
        help="comma-separated epochs of the ×0.1 decays, each before the end of "
        "training (default: 1/3, 2/3 and 8/9 of --epochs, Goyal's 30, 60, 80 "
        "of 90)",
    )
    a(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="L2 on conv/dense kernels",
    )
    a(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="α of the cross-entropy",
    )
    a(
        "--widths",
        type=ints,
        default=shown(defaults.widths),
        help="SmallResNet1D stage widths, comma-separated (three)",
    )


def check_at_least_one(args: argparse.Namespace, *dests: str) -> None:
    """``FlagError`` for the first of ``dests`` whose value is below 1."""
    for dest in dests:
        value = getattr(args, dest)
        if value < 1:
            raise FlagError(flag_name(dest), f"must be at least 1, got {value}")


def schedule_milestones(args: argparse.Namespace) -> tuple[float, ...]:
    """``--milestones`` (default: ``default_milestones(--epochs)``), checked against
    ``--epochs`` and ``--warmup-epochs``; ``FlagError`` for a schedule that cannot
    work (a decay at or after the end, or before the warmup ends)."""
    milestones = args.milestones
    given = milestones is not None
    if not given:
        milestones = default_milestones(args.epochs)
    where = "" if given else f" (the default for --epochs {args.epochs})"
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise FlagError(
            "--milestones",
            f"milestones {shown(milestones)}{where} must be strictly increasing",
        )
    if milestones and milestones[0] <= 0:
        raise FlagError(
            "--milestones",
            f"milestones {shown(milestones)}{where} must be > 0 (epochs)",
        )
    if milestones and milestones[-1] >= args.epochs:
        raise FlagError(
            "--milestones",
            f"milestones {shown(milestones)}{where}: a decay at or after the "
            f"end of training (--epochs {args.epochs}) never takes effect",
        )
    if milestones and args.warmup_epochs >= milestones[0]:
        raise FlagError(
            "--warmup-epochs",
            f"the warmup of {args.warmup_epochs:g} epochs must end before the "
            f"first decay of --milestones {shown(milestones)}{where}",
        )
    return tuple(milestones)


def check_recipe_arguments(args: argparse.Namespace) -> tuple[float, ...]:
    """Checks the flags of ``add_recipe_arguments``; returns the milestones.

    ``FlagError`` for an n or a number of epochs below 1, milestones that cannot
    work (``schedule_milestones``), a label smoothing outside [0, 1] or widths
    that are not three positive integers. The rest (a negative rate, say) is the
    library's to refuse: see ``library_checks``.
    """
    check_at_least_one(args, "small_batch", "epochs")
    milestones = schedule_milestones(args)
    if not 0 <= args.label_smoothing <= 1:
        raise FlagError(
            "--label-smoothing", f"must be in [0, 1], got {args.label_smoothing}"
        )
    if len(args.widths) != 3 or min(args.widths) < 1:
        raise FlagError(
            "--widths", f"expected three positive widths, got {shown(args.widths)}"
        )
    return milestones


def settings_fields(args: argparse.Namespace, settings_type: Any) -> dict[str, Any]:
    """The values of ``args`` whose dests name fields of the dataclass
    ``settings_type`` (a field without a flag keeps its default)."""
    flags = vars(args)
    return {
        f.name: flags[f.name]
        for f in dataclasses.fields(settings_type)
        if f.name in flags
    }


def check_batches(
    batches: Mapping[str, Sequence[int]], group: int, n_train: int, devices: int
) -> None:
    """``FlagError`` unless every batch can train here, naming its flag.

    Each batch must fit in the ``n_train`` training examples and split into
    ghost BatchNorm groups of ``group`` inside each process
    (``distributed.check_groups``), and the group must split over the
    ``devices`` (``--small-batch``).

    Args:
      batches: the batches of the runs, by the flag that sets them.
      group: n, the ghost BatchNorm group.
      n_train: the training examples.
      devices: the devices that each batch is sharded over.
    """
    for flag, values in batches.items():
        if values and max(values) > n_train:
            raise FlagError(
                flag,
                f"{max(values)} exceeds the {n_train} training sequences of --samples",
            )
    for flag, values in batches.items():  # ghost BatchNorm groups stay in a process
        for batch in values:
            check_groups(batch, group, jax.process_count(), flag=flag)
    if group % devices:
        raise FlagError(
            "--small-batch", f"{group} does not split over the {devices} devices"
        )


@contextlib.contextmanager
def library_checks(own: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turns the library's ``ValueError`` in the block into a ``FlagError``.

    The library names the argument it refuses (``"base_lr must be >= 0, got
    -1"``); the error blames the flag that set it: ``RECIPE_FLAGS``, then ``own``
    (an experiment's own, argument → flag); an argument in neither is named as
    itself.
    """
    try:
        yield
    except ValueError as error:
        argument = str(error).split(" ", 1)[0]
        flag = {**RECIPE_FLAGS, **(own or {})}.get(argument, argument)
        raise FlagError(flag, str(error)) from None
