"""Independent references for the kernel tests: fla's pure-torch `naive.py` files, loaded by path.

`import fla` would run fla's package `__init__`, which imports triton; the CPU install has no
triton. `importlib.util.find_spec` on the top-level name locates the package without executing
it, and each `naive.py` imports only torch and einops, so the files load on their own.
"""

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType


def fla_dir() -> Path | None:
    """Directory of the installed `fla` package, or None; never imports it."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@cache
def load_fla_naive(op: str) -> ModuleType | None:
    """`fla/ops/<op>/naive.py` as a standalone module (e.g. op='gated_delta_rule'), or None."""
    root = fla_dir()
    if root is None or importlib.util.find_spec("einops") is None:
        return None
    path = root / "ops" / op / "naive.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
