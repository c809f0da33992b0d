"""Generic loader for the custom CUDA kernels in the repository's ``kernels/*.cu``.

A kernel file is specialised by a ``#define`` preamble (dtypes, connectivity, the kernel's own
name) and compiled with ``cupy.RawModule(code=..., name_expressions=[...])``, once per device and
set of static parameters (as cuCIM ``feature/blob.py`` and cupyx ``ndimage/_filters.py`` do).
:func:`kernel_source` needs no CuPy, so the tests can compile the exact code with
``nvcc --ptx``. Kernel factories of other stages add themselves here as ``*_kernel`` functions.
"""

from __future__ import annotations

import functools
import importlib.resources

# The top-level kernels/ folder is installed as the package sapsam_jax.kernels (pyproject.toml).
KERNEL_DIR = importlib.resources.files("sapsam_jax.kernels")
# NVRTC flags; C++14 keeps the sources compilable by every CUDA toolkit CuPy supports.
NVRTC_OPTIONS = ("--std=c++14",)


def as_defines(defines) -> tuple[tuple[str, str], ...]:
    """``defines`` (a mapping or (name, value) pairs) as a hashable tuple of string pairs."""
    items = defines.items() if hasattr(defines, "items") else defines
    return tuple((str(name), str(value)) for name, value in items)


@functools.cache
def _file_text(filename: str) -> str:
    return (KERNEL_DIR / filename).read_text()


def kernel_source(filename: str, defines=()) -> str:
    """The ``#define`` preamble followed by the kernel file: exactly what gets compiled."""
    preamble = "".join(f"#define {name} {value}\n" for name, value in as_defines(defines))
    return preamble + _file_text(filename)


@functools.cache
def _module(device_id: int, filename: str, name: str, defines: tuple):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=kernel_source(filename, defines),
            options=NVRTC_OPTIONS,
            name_expressions=(name,),
        )


def load_kernel(filename: str, name: str, defines=()):
    """Kernel ``name`` of ``filename`` under ``defines``, compiled for the current device.

    Memoized per (device, file, name, defines), so each specialisation compiles once.
    """
    import cupy

    module = _module(cupy.cuda.Device().id, filename, name, as_defines(defines))
    return module.get_function(name)


# --- factories -------------------------------------------------------------------------------

WATERSHED_FILE = "watershed.cu"
_LEVEL_TYPES = {1: ("unsigned char", "u8"), 2: ("unsigned short", "u16")}


def watershed_flood_defines(level_itemsize: int, connectivity: int) -> tuple:
    """Preamble of the flooding kernel; its name spells the specialisation out."""
    c_type, suffix = _LEVEL_TYPES[int(level_itemsize)]
    name = f"sapsam_watershed_flood_3d_c{int(connectivity)}_{suffix}"
    return (("LEVEL_T", c_type), ("CONNECTIVITY", int(connectivity)), ("FLOOD_KERNEL", name))


def watershed_flood_kernel(level_itemsize: int, connectivity: int):
    """The marker-flooding step kernel (``kernels/watershed.cu``) for this device."""
    defines = watershed_flood_defines(level_itemsize, connectivity)
    return load_kernel(WATERSHED_FILE, dict(defines)["FLOOD_KERNEL"], defines)
