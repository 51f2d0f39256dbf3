"""The demo: Goyal et al.'s experiments on MNIST-1D, ``python -m optax_warmup.demo``.

A client of the public API (``import optax_warmup as ow``); nothing in the library
imports it. Importing it has no side effects: those are in ``__main__``.

Modules:
  ``__main__``: the command line: parse → plan → run → write; the registry of the
    experiments (``EXPERIMENTS``).
  ``experiment``: what an experiment is: ``Experiment``, one definition that names
    its parts (settings, flags, one run, analysis, report); ``Run``, ``FlagError``.
  ``warmup``: the warmup experiment (Table 1), whole; ``batch_size``: the
    batch-size experiment (Figure 1, the noise scale, LARS), whole. Each imports
    only the shared modules below, never the other.
  ``flags``: the recipe's flags that every experiment shares and their checks.
  ``model``: the zero-γ ``SmallResNet1D`` with ghost BatchNorm.
  ``training``: one run of a classifier on one device mesh, per-epoch curves.
  ``runner``: a list of runs on this machine: in this process or one CPU worker
    process per core, with a progress bar.
  ``distributed``: one run across processes (``jax.distributed``): the cluster's
    flags, joining it with clear errors, the collectives of the command line (same
    settings everywhere, one error stops all), each process's rows of a batch;
    ``launcher``: ``--processes N`` on this machine, and its faults.
  ``store``: ``--out``: each finished run written at once and atomically; resume.
  ``stats``: the statistics (Goyal's final error, mean ± std, Welch's t-test
    against the reference, the shift with its distribution-free interval, steps to
    a target, McCandlish et al.'s critical batch).
  ``report``: the report's table cells and its figures' frame.
  ``data``: MNIST-1D, generated locally and cached.
"""
