"""The demo: Goyal et al.'s experiments on MNIST-1D, ``python -m optax_warmup.demo``.

A client of the public API (``import optax_warmup as ow``); nothing in the library
imports it. Importing it has no side effects: those are in ``__main__``.

Modules:
  ``__main__``: the command line: parse → plan → run → write.
  ``experiment``: the interface an experiment implements (``Experiment``, ``Run``).
  ``warmup``: the warmup experiment (Table 1): its configurations, settings,
    flags and one run; ``warmup_report``: its summary, table and figures.
  ``training``: one run of a classifier on one device mesh, per-epoch curves.
  ``runner``: a list of runs on this machine: in this process or one CPU worker
    process per core, with a progress bar.
  ``distributed``: one run across processes (``jax.distributed``): the cluster's
    flags, joining it with clear errors, the collectives of the command line (same
    settings everywhere, one error stops all), each process's rows of a batch;
    ``launcher``: ``--processes N`` on this machine, and its faults.
  ``store``: ``--out``: each finished run written at once and atomically; resume.
  ``report``: statistics and table cells shared by the experiments (Goyal's final
    error, mean ± std, Welch's t-test against the reference).
  ``data``: MNIST-1D, generated locally and cached.
"""
