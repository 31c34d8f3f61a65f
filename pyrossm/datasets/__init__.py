"""Data for pyrossm: real series, benchmark loaders, simulators and user files.

* :func:`load_nile` / :func:`nile_tensor` — the Nile flow series (shipped with the package).
* :func:`load_jsb_chorales`, :func:`load_ptb` — benchmark files read from ``data_dir``,
  ``$PYROSSM_DATA_DIR`` or the cache (``$PYROSSM_CACHE_DIR``, default ``~/.cache/pyrossm``),
  verified by sha256, downloaded into the cache when missing and reachable
  (:func:`fetch_file`; ``PYROSSM_OFFLINE=1`` disables downloads).
* :func:`random_stable_system`, :func:`simulate_linear_gaussian`, :func:`simulate_pendulum`,
  :func:`simulate_lorenz` — simulated sequences ``(batch, time, dim)``.
* :func:`load_array` / :func:`save_array` — user CSV / NumPy data, NaN = missing.

Importing this module does no work: no directory is created and nothing is downloaded.
"""

from ._files import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    KNOWN_FILES,
    OFFLINE_ENV,
    RemoteFile,
    cache_dir,
    fetch_file,
    search_dirs,
    sha256sum,
    verify_sha256,
)
from .jsb import JSBChorales, load_jsb_chorales
from .nile import NileData, load_nile, nile_tensor
from .ptb import load_ptb
from .simulate import (
    LinearGaussianParams,
    Simulation,
    lorenz_obs_matrix,
    random_stable_system,
    simulate_linear_gaussian,
    simulate_lorenz,
    simulate_pendulum,
)
from .user import load_array, save_array

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "JSBChorales",
    "KNOWN_FILES",
    "LinearGaussianParams",
    "NileData",
    "OFFLINE_ENV",
    "RemoteFile",
    "Simulation",
    "cache_dir",
    "fetch_file",
    "load_array",
    "load_jsb_chorales",
    "load_nile",
    "load_ptb",
    "lorenz_obs_matrix",
    "nile_tensor",
    "random_stable_system",
    "save_array",
    "search_dirs",
    "sha256sum",
    "simulate_linear_gaussian",
    "simulate_lorenz",
    "simulate_pendulum",
    "verify_sha256",
]
