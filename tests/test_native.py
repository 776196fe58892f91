"""The mypyc build of the hot metric modules: used when built, and the source still right on its own."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import metrics
import metrics.customer as metrics_customer
import metrics.store as metrics_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
PURE_BEFORE_IMPORT = os.environ.get("LOYALTY_PURE_PYTHON")
compile_metrics = importlib.import_module("compile_metrics")


def test_compiled_build_is_loaded_where_it_can_be_built() -> None:
    """With a C compiler and Python's headers here, the suite runs the compiled modules (bootstrap built them)."""
    # importing the build script must not switch the workers the later tests start to pure Python
    assert os.environ.get("LOYALTY_PURE_PYTHON") == PURE_BEFORE_IMPORT
    lacking = compile_metrics.missing_tools()
    # LOYALTY_PURE_PYTHON=1 pytest runs the whole suite on the source
    expected = "pure" if lacking is not None or metrics.pure_python_forced() else "compiled"
    assert expected == metrics.IMPLEMENTATION, (
        f"metrics run {metrics.IMPLEMENTATION}, expected {expected} ({lacking or 'tools present'}): "
        "make native builds them, and an edited module needs a rebuild"
    )
    for module in (metrics_store, metrics_customer):
        assert str(module.__file__).endswith(".py") == (expected == "pure"), module.__file__


def test_source_doctests_pass_as_pure_python() -> None:
    """The compiled modules' doctests run on their source (a subprocess with LOYALTY_PURE_PYTHON=1)."""
    paths = [f"metrics/{name}.py" for name in metrics.COMPILED_MODULES]
    env = {**os.environ, "LOYALTY_PURE_PYTHON": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules", *paths],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    # one doctest item per documented function or class: the five modules with examples have dozens
    assert passed is not None and int(passed.group(1)) >= 40, result.stdout[-2000:]


def test_pure_python_loader_ignores_the_build() -> None:
    """LOYALTY_PURE_PYTHON=1 loads every metric module from its source, whatever is built."""
    code = (
        "import metrics, metrics.store, metrics.customer;"
        "print(metrics.IMPLEMENTATION, metrics.store.__file__, metrics.customer.__file__)"
    )
    env = {**os.environ, "LOYALTY_PURE_PYTHON": "1"}
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert output[0] == "pure"
    assert all(path.endswith(".py") for path in output[1:]), output


def test_stale_build_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose stamp does not match the source is ignored with a warning; a matching one is taken."""
    monkeypatch.delenv("LOYALTY_PURE_PYTHON", raising=False)
    monkeypatch.setattr(metrics, "NATIVE_DIR", tmp_path)
    assert metrics._native_build() is None  # nothing built there
    (tmp_path / "SOURCES").write_text(metrics.sources_digest() + "\n")
    assert metrics._native_build() == str(tmp_path)
    (tmp_path / "SOURCES").write_text("0" * 64 + "\n")
    with pytest.warns(RuntimeWarning, match="older than their source"):
        assert metrics._native_build() is None
    (tmp_path / "SOURCES").write_text(metrics.sources_digest() + "\n")
    monkeypatch.setenv("LOYALTY_PURE_PYTHON", "1")
    assert metrics._native_build() is None
