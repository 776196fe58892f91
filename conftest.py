"""Root of the test session: doctests of compiled metric modules run against their source elsewhere.

When the mypyc build is loaded (``metrics.IMPLEMENTATION == "compiled"``), importing
``metrics/store.py`` by path would meet the extension module instead, so those files are
not collected here; ``tests/test_native.py`` runs their doctests on the source in a
pure-Python subprocess.
"""

import metrics

collect_ignore = (
    [f"metrics/{name}.py" for name in metrics.COMPILED_MODULES] if metrics.IMPLEMENTATION == "compiled" else []
)
