"""Compile the hot metric modules with mypyc, and the C loop beside them, into build/native/metrics/.

See metrics/__init__.py for how they are loaded.

Run by `make native` and `make bootstrap`; safe to run again: it does nothing when the
build's stamp matches the sources. Without a C compiler or Python's headers it says so
and leaves the product on pure Python (the same results, slower), exiting 0; a compiler
that fails on present tools is an error (exit 1), not a silent fallback.

    python scripts/compile_metrics.py [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def missing_tools() -> str | None:
    """What the build lacks (a C compiler, Python.h, mypyc, setuptools), or ``None``."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Python.h)"
    try:
        import mypyc.build  # noqa: F401
        import setuptools  # noqa: F401
    except ImportError as error:
        return f"no {error.name} (the dev dependency group)"
    return None


def build() -> None:
    """Compile into a scratch folder, then move the modules and the stamp into place (stamp last)."""
    from mypyc.build import mypycify
    from setuptools import Extension, setup

    from metrics import C_MODULES, COMPILED_MODULES, NATIVE_DIR, sources_digest

    stamp = sources_digest()
    with tempfile.TemporaryDirectory(prefix="loyalty-native-") as scratch:
        scratch_path = Path(scratch)
        sources = [f"metrics/{name}.py" for name in COMPILED_MODULES]
        # the group's shared library lives inside the package, so the package's path finds it
        extensions = mypycify(sources, opt_level="3", group_name="metrics.native", target_dir=str(scratch_path / "c"))
        extensions += [Extension(f"metrics.{name}", [f"metrics/{name}.c"], extra_compile_args=["-O2"])
                       for name in C_MODULES]
        with warnings.catch_warnings():
            # setuptools reads the project's pyproject.toml and warns about hatchling's license table
            warnings.simplefilter("ignore")
            setup(
                name="loyalty-metrics-native",
                packages=[],
                py_modules=[],
                ext_modules=extensions,
                script_args=[
                    "--quiet", "build_ext",
                    "--build-lib", str(scratch_path / "lib"),
                    "--build-temp", str(scratch_path / "tmp"),
                ],
            )
        built = sorted((scratch_path / "lib" / "metrics").glob("*.so")) + sorted(
            (scratch_path / "lib" / "metrics").glob("*.pyd")
        )
        expected = len(COMPILED_MODULES) + 1 + len(C_MODULES)
        if len(built) != expected:
            names = [path.name for path in built]
            raise SystemExit(f"error: the build made {names}, expected {expected} modules")
        if NATIVE_DIR.exists():
            shutil.rmtree(NATIVE_DIR)
        NATIVE_DIR.mkdir(parents=True)
        for path in built:
            shutil.copy2(path, NATIVE_DIR / path.name)
        (NATIVE_DIR / "SOURCES").write_text(stamp + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the build matches the sources")
    options = parser.parse_args()
    # the package is imported as source here: it must not load (or warn about) the build this replaces;
    # set in main only, so that importing this module (tests/test_native.py) changes no environment
    os.environ["LOYALTY_PURE_PYTHON"] = "1"
    from metrics import C_MODULES, COMPILED_MODULES, native_build_current

    if not options.force and native_build_current():
        print("compiled metrics are up to date")
        return 0
    lacking = missing_tools()
    if lacking is not None:
        print(f"compiled metrics skipped: {lacking}; the metrics run as pure Python")
        return 0
    os.chdir(ROOT)  # mypyc names modules by their paths relative to the working folder
    build()
    print(f"compiled metrics built: {', '.join(COMPILED_MODULES + C_MODULES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
