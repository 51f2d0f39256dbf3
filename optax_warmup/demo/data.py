"""MNIST-1D for the demo: generated locally with ``mnist1d`` and cached on disk.

MNIST-1D (Greydanus 2020) is a procedurally generated, 40-sample, 1-D stand-in for
MNIST. The ``mnist1d`` package can download the paper's pickle or generate the data
with ``make_dataset``; the demo only ever generates (no network access), with the
package's default arguments except ``num_samples``. With the defaults
(``num_samples=5000``, ``train_split=0.8``, seed 42) that is the standard split of
4000 training and 1000 test sequences that the MNIST-1D paper reports on.

Generation costs about 0.4 ms per sample, so the arrays are cached as ``.npz`` under
the user's cache directory (``$OPTAX_WARMUP_CACHE``, else
``$XDG_CACHE_HOME/optax_warmup``, else ``~/.cache/optax_warmup``) and reused.

References:
  Greydanus 2020, Scaling Down Deep Learning (MNIST-1D), arXiv:2011.14439.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from optax_warmup._validation import check_int
from optax_warmup.demo.store import atomic_write

STANDARD_SAMPLES = 5000  # mnist1d's default: a 4000/1000 train/test split
NUM_CLASSES = 10
SEED = 42  # mnist1d's default generation seed
_FORMAT = 1  # bump when the cached arrays change meaning

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """Where generated datasets are cached (see the module docstring)."""
    explicit = os.environ.get("OPTAX_WARMUP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "optax_warmup"


def cache_path(num_samples: int, seed: int, cache_dir: str | Path) -> Path:
    """The file that holds the dataset of ``num_samples`` sequences and ``seed``."""
    return Path(cache_dir) / f"mnist1d-n{num_samples}-seed{seed}-v{_FORMAT}.npz"


def check_num_samples(num_samples: int) -> None:
    """Raises ``ValueError`` unless ``num_samples`` is an int, a multiple of 10, >= 20.

    ``mnist1d`` makes ``num_samples // 10`` sequences per class, so the count is
    exact only for multiples of 10; a float (even ``100.0``) is refused rather than
    rounded.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise ValueError(f"num_samples must be an integer, got {num_samples!r}")
    check_int("num_samples", num_samples, low=2 * NUM_CLASSES)
    if num_samples % NUM_CLASSES:
        raise ValueError(
            f"num_samples must be a multiple of {NUM_CLASSES}, got {num_samples!r}"
        )


def generate(num_samples: int, seed: int = SEED) -> Arrays:
    """Generates MNIST-1D with ``mnist1d.data.make_dataset`` (no download).

    Args:
      num_samples: the number of sequences, train and test together (a multiple of
        10, at least 20; the package makes ``num_samples // 10`` per class). 80% are
        training sequences, the package's default split.
      seed: the package's generation seed (its default is 42).

    Returns:
      ``{"x_train", "y_train", "x_test", "y_test"}``: float32 ``(N, 40, 1)``
      sequences (channels-last, standardized by the package) and int32 labels.
    """
    check_num_samples(num_samples)
    # mnist1d imports matplotlib.pyplot at import time: keep it off any GUI backend.
    import matplotlib

    matplotlib.use("Agg")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    # make_dataset seeds numpy's global generator; leave the caller's state alone.
    state = np.random.get_state()  # noqa: NPY002 (mnist1d uses it)
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return {
        "x_train": np.asarray(data["x"], np.float32)[..., None],
        "y_train": np.asarray(data["y"], np.int32),
        "x_test": np.asarray(data["x_test"], np.float32)[..., None],
        "y_test": np.asarray(data["y_test"], np.int32),
    }


def load(
    num_samples: int = STANDARD_SAMPLES,
    *,
    seed: int = SEED,
    cache_dir: str | Path | None = None,
) -> tuple[Arrays, bool]:
    """Returns the cached dataset, generating and caching it on the first call.

    Args:
      num_samples: as in ``generate``; 5000 is the standard 4000/1000 split.
      seed: as in ``generate``.
      cache_dir: the cache directory (default ``default_cache_dir()``).

    Returns:
      ``(arrays, generated)``: the arrays of ``generate`` and whether they were
      generated now (False: read from the cache).
    """
    check_num_samples(num_samples)
    path = cache_path(num_samples, seed, cache_dir or default_cache_dir())
    if path.exists():
        with np.load(path) as cached:
            return {key: cached[key] for key in cached.files}, False
    arrays = generate(num_samples, seed)
    # Written then renamed: a concurrent reader never sees half a file.
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    return arrays, True
