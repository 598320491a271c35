"""The one place that imports mamba-ssm.

mamba-ssm's package `__init__` imports its compiled CUDA extensions (selective scan, causal conv),
which a build with only the Triton ops lacks. The SSD kernels live in `mamba_ssm.ops.triton`,
whose own `__init__` files are empty, so we register an empty `mamba_ssm` package pointing at the
installed directory and import the submodule through it.
"""

import importlib
import importlib.util
import sys
import types


def mamba_ssm_installed() -> bool:
    """Whether mamba-ssm is installed (checked without importing it)."""
    return importlib.util.find_spec("mamba_ssm") is not None


def mamba_chunk_scan_combined():
    """`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`, without running the package `__init__`."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mamba-ssm is not installed")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mamba_ssm"] = package
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
