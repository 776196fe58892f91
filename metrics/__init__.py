"""Pure customer-loyalty metric math: no I/O, no Faust, no clock reads.

Time is always an argument (epoch milliseconds); money is integer micro-units.

The hot modules (:data:`COMPILED_MODULES`) may also be compiled by mypyc
(``scripts/compile_metrics.py``, run by ``make bootstrap``) into
``build/native/metrics/``: the same source as C extensions, about a third
faster, beside :data:`C_MODULES`, the innermost loops in C. They
are loaded instead of the source only when the build's stamp matches the source
files byte for byte, so an edited module never runs a stale build;
``LOYALTY_PURE_PYTHON=1`` runs the source whatever is built.
:data:`IMPLEMENTATION` says which one this process runs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

#: the modules mypyc compiles: the per-event and per-delta paths and what they call
COMPILED_MODULES = ("intervals", "timegrid", "formulas", "catalog", "customer", "store", "validation")
#: C written by hand, built with them: the innermost loops of the facts stage and the aggregation
#: (``metrics._blocks``, see ``metrics.customer._grouped_rows`` and ``metrics.store._add_pairs``,
#: which run when it is not built)
C_MODULES = ("_blocks",)
#: where the compiled modules lie, beside a ``SOURCES`` stamp (:func:`sources_digest`)
NATIVE_DIR = Path(__file__).resolve().parent.parent / "build" / "native" / "metrics"


def sources_digest() -> str:
    """SHA-256 over the compiled modules' sources: a build is used only for the very source it came from."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in COMPILED_MODULES:
        digest.update(name.encode() + b"\0" + (here / f"{name}.py").read_bytes() + b"\0")
    for name in C_MODULES:
        digest.update(name.encode() + b"\0" + (here / f"{name}.c").read_bytes() + b"\0")
    return digest.hexdigest()


def pure_python_forced() -> bool:
    """Whether ``LOYALTY_PURE_PYTHON`` asks for the source whatever is built (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get("LOYALTY_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on")


def native_build_current() -> bool | None:
    """Whether the build's stamp matches the sources; ``None`` when nothing is built."""
    try:
        stamp = (NATIVE_DIR / "SOURCES").read_text().strip()
    except OSError:
        return None
    return stamp == sources_digest()


def native_function(name: str) -> Any:
    """A function of ``metrics._blocks`` when it is built and loaded (not pure Python), else ``None``."""
    try:
        return getattr(importlib.import_module("metrics._blocks"), name)
    except ImportError:
        return None


def _native_build() -> str | None:
    """The compiled modules' folder when its stamp matches the sources, else ``None`` (warning when stale)."""
    if pure_python_forced():
        return None
    current = native_build_current()
    if current is False:
        warnings.warn(
            "the compiled metrics are older than their source: running pure Python (make native rebuilds them)",
            RuntimeWarning,
            stacklevel=2,
        )
    return str(NATIVE_DIR) if current else None


_native = _native_build()
if _native is not None:
    # searched before this folder, so `metrics.store` imports the extension module
    __path__.insert(0, _native)
#: ``"compiled"`` (mypyc build of :data:`COMPILED_MODULES`) or ``"pure"`` (the source)
IMPLEMENTATION = "pure" if _native is None else "compiled"
