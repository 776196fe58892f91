"""The mypyc build of the hot metric modules: used when built, and the source still right on its own."""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import metrics
import metrics.customer as metrics_customer
import metrics.store as metrics_store
from metrics.intervals import MINUS_INFINITY, PLUS_INFINITY, normalise

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
PURE_BEFORE_IMPORT = os.environ.get("LOYALTY_PURE_PYTHON")
compile_metrics = importlib.import_module("compile_metrics")


def _in_ci() -> bool:
    """Whether the suite runs in CI (``CI`` set to anything but "", "0" or "false", as CI services set it),
    where the compiled modules must be built: without them every comparison with C would be skipped."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def test_compiled_build_is_loaded_where_it_can_be_built() -> None:
    """With a C compiler and Python's headers here, and always in CI, the suite runs the compiled modules."""
    # importing the build script must not switch the workers the later tests start to pure Python
    assert os.environ.get("LOYALTY_PURE_PYTHON") == PURE_BEFORE_IMPORT
    lacking = compile_metrics.missing_tools()
    # LOYALTY_PURE_PYTHON=1 pytest runs the whole suite on the source
    expected = "pure" if (lacking is not None and not _in_ci()) or metrics.pure_python_forced() else "compiled"
    assert expected == metrics.IMPLEMENTATION, (
        f"metrics run {metrics.IMPLEMENTATION}, expected {expected} ({lacking or 'tools present'}): "
        "make native builds them, and an edited module needs a rebuild"
    )
    for module in (metrics_store, metrics_customer):
        assert str(module.__file__).endswith(".py") == (expected == "pure"), module.__file__
    # the C loops are built and loaded with them, and only with them
    loops = (metrics_store._NATIVE_ADD_PAIRS, metrics_store._NATIVE_DENSE_SUM, metrics_customer._NATIVE_GROUPED_ROWS)
    for loop in loops:
        assert (loop is None) == (expected == "pure")


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


def _native(name: str) -> Any:
    """A function of the C module: as the metrics loaded it, or from the current build when they run pure
    (LOYALTY_PURE_PYTHON=1).

    Skipped only on a machine that cannot build it (no C compiler or headers), and never in CI
    (``CI`` set, as CI services set it): there every comparison with C would be skipped at once.
    One that can build it and has no current build fails, as the first test does.
    """
    loaded = metrics.native_function(name)
    if loaded is not None:
        return loaded
    if metrics.native_build_current():
        # the C module needs nothing else of the build: loaded from its file, beside the pure source
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = metrics.NATIVE_DIR / f"_blocks{suffix}"
            if path.exists():
                spec = importlib.util.spec_from_file_location("metrics._blocks", path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return getattr(module, name)
    lacking = compile_metrics.missing_tools()
    if lacking is None:
        pytest.fail("a C compiler is here and the C module is not built (or is stale): make native builds it")
    if _in_ci():
        pytest.fail(f"CI runs without the C module to compare ({lacking}): give the CI machine a C compiler")
    pytest.skip(f"no C module here to compare: {lacking}")


@pytest.mark.parametrize(("ci", "outcome"), [
    ("true", pytest.fail.Exception),  # CI: every comparison with C would be skipped at once
    ("1", pytest.fail.Exception),
    ("", pytest.skip.Exception),      # a user's machine without a compiler: the product runs pure Python
    ("false", pytest.skip.Exception),
])
def test_a_machine_without_a_compiler_skips_the_c_comparisons_outside_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException],
) -> None:
    """Without a C module and the tools to build it, the comparisons skip on a user's machine and fail in CI."""
    monkeypatch.setattr(metrics, "native_function", lambda name: None)
    monkeypatch.setattr(metrics, "native_build_current", lambda: False)
    monkeypatch.setattr(compile_metrics, "missing_tools", lambda: "no C compiler (cc)")
    monkeypatch.setenv("CI", ci)
    # both caught here, so that a skip where a failure is due fails this test instead of skipping it
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="no C") as raised:
        _native("add_pairs")
    assert raised.type is outcome


def _block_values(blocks: dict[int, Any]) -> dict[int, dict[int, int]]:
    """Each block's nonzero slots (a sparse dict, an array or a list alike)."""
    values: dict[int, dict[int, int]] = {}
    for index, block in blocks.items():
        slots = block.items() if isinstance(block, dict) else enumerate(block)
        values[index] = {slot: value for slot, value in slots if value}
    return values


def _existing_blocks(draw: st.DrawFn) -> tuple[dict[int, Any], dict[int, int]]:
    """Blocks of every kind a series holds: sparse, dense of each integer type, and a list past int64."""
    blocks: dict[int, Any] = {}
    for index in draw(st.sets(st.integers(-3, 3), max_size=3)):
        kind = draw(st.sampled_from(("sparse", "wide", *metrics_store._DENSE_TYPES)))
        code = kind if kind in metrics_store._DENSE_TYPES else "q"
        bound = metrics_store._TYPE_BOUNDS[code]
        slots = draw(st.dictionaries(st.integers(0, 1023), st.integers(-bound, bound - 1), max_size=6))
        if kind == "sparse":
            blocks[index] = dict(slots)
        else:
            block: Any = metrics_store._zeros(code, 1024)
            if kind == "wide":
                block = list(block)
                slots[0] = 2**70
            for slot, value in slots.items():
                block[slot] = value
            blocks[index] = block
    sums = {index: sum(block.values()) if isinstance(block, dict) else sum(block) for index, block in blocks.items()}
    return blocks, sums


@st.composite
def _series_and_pairs(draw: st.DrawFn) -> tuple[dict[int, Any], dict[int, int], list[int], int, int]:
    blocks, sums = _existing_blocks(draw)
    # buckets over a few blocks (negative ones too), deltas small or out of int64, some on one bucket
    buckets = st.integers(-3 * 1024, 4 * 1024 - 1)
    deltas = st.one_of(st.integers(-5, 5), st.integers(-300, 300), st.integers(-70_000, 70_000),
                       st.integers(-(2**64), 2**64), st.sampled_from((2**63 - 1, -(2**63))))
    pairs = [item for bucket, delta in draw(st.lists(st.tuples(buckets, deltas), max_size=80))
             for item in (bucket, delta)]
    floor = draw(st.sampled_from((MINUS_INFINITY, -1024, 0, 700, 2048)))
    sparse_max = draw(st.sampled_from((0, 3, 16, 48)))
    return blocks, sums, pairs, floor, sparse_max


def _nonzero(sums: dict[int, int]) -> dict[int, int]:
    return {index: total for index, total in sums.items() if total}


@settings(max_examples=400, deadline=None)
@given(case=_series_and_pairs())
# block 0's deltas cancel: the Python loop, leaving it for block -1 and coming back, writes its sum 0
@example(case=({}, {}, [0, 3, -1, 0, 0, -3], MINUS_INFINITY, 0))
def test_the_c_loop_adds_what_the_python_loop_adds(
    case: tuple[dict[int, Any], dict[int, int], list[int], int, int],
) -> None:
    """metrics._blocks.add_pairs leaves the same block values and sums, and returns the same sum below the floor."""
    native = _native("add_pairs")
    blocks, sums, pairs, floor, sparse_max = case
    python_blocks, python_sums = copy.deepcopy(blocks), dict(sums)
    native_blocks, native_sums = copy.deepcopy(blocks), dict(sums)
    original = list(pairs)
    with pytest.MonkeyPatch.context() as patched:
        # the Python loop with the same sparse limit (its module constant)
        patched.setattr(metrics_store, "_SPARSE_MAX", sparse_max)
        folded = metrics_store._add_pairs(python_blocks, python_sums, pairs, floor)
    assert native(native_blocks, native_sums, pairs, floor, sparse_max,
                  metrics_store._densify, metrics_store._widen) == folded
    assert pairs == original
    assert _block_values(native_blocks) == _block_values(python_blocks)
    # a block sum is its value where it has an entry, 0 where it has none (PrefixSeries.sums): in bucket order
    # a block's deltas that cancel leave no entry where the Python loop's order may have written a 0
    assert _nonzero(native_sums) == _nonzero(python_sums)
    for index, block in native_blocks.items():
        # the block sums are the blocks' own sums; a sparse block past the limit was densified
        assert native_sums.get(index, 0) == (sum(block.values()) if isinstance(block, dict) else sum(block))
        if isinstance(block, dict):
            assert len(block) <= max(sparse_max, len(blocks.get(index, {})))
        elif isinstance(block, array):
            # a dense block's type never narrows, and it holds every value (a list holds the rest)
            assert block.typecode in metrics_store._DENSE_TYPES
            before = blocks.get(index)
            if isinstance(before, array):
                assert block.itemsize >= before.itemsize


@pytest.mark.parametrize(
    "pairs",
    [[3, "1"], [3, 1.0], [2**63, 1], [-(2**63) - 1, 1], [1, 1, 2**64, 1]],
    ids=["text delta", "float delta", "bucket past int64", "bucket below int64", "second bucket past int64"],
)
def test_the_c_loop_leaves_pairs_it_cannot_take_to_python(pairs: list[Any]) -> None:
    """A pair that is not two ints, or a bucket out of int64, makes the C loop return None having changed nothing."""
    native = _native("add_pairs")
    blocks: dict[int, Any] = {0: {5: 2}}
    sums = {0: 2}
    assert native(blocks, sums, pairs, MINUS_INFINITY, 48, metrics_store._densify, metrics_store._widen) is None
    assert (blocks, sums) == ({0: {5: 2}}, {0: 2})


def test_the_c_loop_refuses_an_odd_group() -> None:
    """An odd number of items is a ValueError, as in add_groups."""
    native = _native("add_pairs")
    with pytest.raises(ValueError, match="odd number"):
        native({}, {}, [1, 2, 3], MINUS_INFINITY, 48, metrics_store._densify, metrics_store._widen)


#: a message's deltas: series of the facts stage's names, buckets of a few blocks, deltas that cancel to 0
#: (kept as zeros by add_difference) or leave int64
_MESSAGE_DELTAS = st.dictionaries(
    st.sampled_from(("A", "F", "P:60", "segP:2:60", "crev:1440", "cm3N")),
    st.dictionaries(st.integers(-2048, 300_000),
                    st.one_of(st.just(0), st.integers(-3, 3), st.integers(-(2**70), 2**70)), max_size=12),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(deltas=_MESSAGE_DELTAS)
def test_the_c_grouping_groups_what_the_python_grouping_groups(deltas: dict[str, dict[int, int]]) -> None:
    """metrics._blocks.grouped_rows gives the Python loop's list: nonzero pairs in order, empty series left out."""
    native = _native("grouped_rows")
    original = copy.deepcopy(deltas)
    grouped = native(deltas)
    assert grouped == metrics_customer._grouped_rows(deltas)
    assert deltas == original
    # and it is the deltas: every nonzero one once, under its series
    assert {series: dict(zip(pairs[0::2], pairs[1::2], strict=True))
            for series, pairs in zip(grouped[0::2], grouped[1::2], strict=True)} == {
        series: {bucket: delta for bucket, delta in buckets.items() if delta}
        for series, buckets in deltas.items() if any(buckets.values())}


def _assert_loops_agree(name: str, python_loop: Any, earlier: dict[str, dict[int, int]],
                        arguments: tuple[Any, ...]) -> None:
    """The C loop ``name`` and its Python twin add equal deltas into copies of ``earlier``, built alike:
    the same series and buckets in the same order (the message's pair order)."""
    by_c, by_python = copy.deepcopy(earlier), copy.deepcopy(earlier)
    assert _native(name)(by_c, *arguments) is True
    python_loop(by_python, *arguments)
    assert [(series, list(buckets.items())) for series, buckets in by_c.items()] == [
        (series, list(buckets.items())) for series, buckets in by_python.items()]
    # into the facts stage's accumulator holding the same earlier deltas: the same rows, in the same order
    accumulator = _native("DeltaAccumulator")()
    accumulator.add_deltas(earlier)
    assert _native(name)(accumulator, *arguments) is True
    assert accumulator.rows() == metrics_customer._grouped_rows(by_python)


#: a customer's orders as the facts keep them: bucket -> latest order time (any int: the loop only subtracts)
_ORDER_TIMES = st.dictionaries(st.integers(-50, 400), st.integers(-(10**13), 10**13), max_size=8)
#: bucket -> net revenue: zero (left out of the sorted buckets), small, or past int64
_REVENUE = st.dictionaries(st.integers(-50, 400), st.one_of(st.just(0), st.integers(-999, 999),
                                                            st.integers(-(2**80), 2**80)), max_size=8)


def _order_arguments(orders: dict[int, int], revenue: dict[int, int], second: int | None, first_ms: int,
                     windows: tuple[int, ...], since: int, sign: int) -> tuple[Any, ...]:
    return (sorted(orders), orders, sorted(b for b, amount in revenue.items() if amount), revenue, second, first_ms,
            metrics_customer._order_windows(windows), since, sign)


@settings(max_examples=400, deadline=None)
@given(orders=_ORDER_TIMES, revenue=_REVENUE, second=st.one_of(st.none(), st.integers(-60, 420)),
       first_ms=st.integers(-(10**13), 10**13), windows=st.lists(st.integers(1, 120), min_size=1, max_size=4,
                                                                  unique=True).map(tuple),
       since=st.one_of(st.just(MINUS_INFINITY), st.integers(-200, 500)), sign=st.sampled_from((1, -1)),
       earlier=_MESSAGE_DELTAS)
def test_the_c_order_loop_adds_what_the_python_loop_adds(
    orders: dict[int, int], revenue: dict[int, int], second: int | None, first_ms: int, windows: tuple[int, ...],
    since: int, sign: int, earlier: dict[str, dict[int, int]],
) -> None:
    """metrics._blocks.order_deltas adds the Python loop's deltas into a message's deltas, in its order."""
    arguments = _order_arguments(orders, revenue, second, first_ms, windows, since, sign)
    _assert_loops_agree("order_deltas", metrics_customer._order_deltas, earlier, arguments)


@pytest.mark.parametrize(
    ("orders", "revenue", "first_ms"),
    [
        ({2**62 + 1: 0}, {}, 0),  # a bucket past 62 bits
        ({5: 2**63}, {}, 0),  # an order time past int64
        ({5: 2**62}, {}, -(2**62)),  # a lifespan past 62 bits
        ({5: 0}, {2**62 + 1: 3}, 0),  # a revenue bucket past 62 bits
    ],
)
def test_the_c_order_loop_declines_what_does_not_fit(orders: dict[int, int], revenue: dict[int, int],
                                                     first_ms: int) -> None:
    """Inputs past 62 bits: the C loop returns None and changes nothing; the Python loop takes them."""
    native = _native("order_deltas")
    out: dict[str, dict[int, int]] = {"A": {1: 1}}
    assert native(out, *_order_arguments(orders, revenue, None, first_ms, (60,), 0, 1)) is None
    assert out == {"A": {1: 1}}


#: normalised intervals as the facts give them (a member interval may start or end at infinity)
_INTERVALS = st.lists(
    st.tuples(st.one_of(st.integers(-100, 400), st.just(MINUS_INFINITY)),
              st.one_of(st.integers(0, 90), st.just(PLUS_INFINITY))),
    max_size=5,
).map(lambda pairs: normalise([(start, start + length if length < PLUS_INFINITY else PLUS_INFINITY)
                                for start, length in pairs]))


@settings(max_examples=400, deadline=None)
@given(active=_INTERVALS.map(lambda spans: [(s, e) for s, e in spans if s > MINUS_INFINITY and e < PLUS_INFINITY]),
       first=st.one_of(st.none(), st.integers(-120, 450)), channel=st.sampled_from((None, "Fch:web", "Fch:other")),
       members=_INTERVALS, rewards=st.sets(st.integers(-120, 450), max_size=6).map(sorted),
       windows=st.lists(st.integers(0, 120), min_size=1, max_size=4, unique=True).map(tuple),
       since=st.one_of(st.just(MINUS_INFINITY), st.integers(-200, 500)), sign=st.sampled_from((1, -1)),
       earlier=_MESSAGE_DELTAS)
@example(active=[(10, 40)], first=10, channel="Fch:web", members=[(12, 30)], rewards=[5, 20], windows=(20,),
         since=0, sign=1, earlier={})
def test_the_c_activity_loop_adds_what_the_python_loop_adds(
    active: list[tuple[int, int]], first: int | None, channel: str | None, members: list[tuple[int, int]],
    rewards: list[int], windows: tuple[int, ...], since: int, sign: int, earlier: dict[str, dict[int, int]],
) -> None:
    """metrics._blocks.activity_deltas adds the Python loop's deltas into a message's deltas, in its order."""
    arguments = (active, first, channel, members, rewards, metrics_customer._activity_windows(windows), since, sign)
    _assert_loops_agree("activity_deltas", metrics_customer._activity_deltas, earlier, arguments)


@pytest.mark.parametrize(
    ("active", "first", "members", "rewards", "window"),
    [
        ([(0, 2**62 + 1)], None, [], [], 60),  # an end past 62 bits
        ([(0, 5)], 2**63, [], [], 60),  # a first activity past int64
        ([(0, 5)], None, [(-(2**62) - 1, 3)], [], 60),  # a member start past 62 bits
        ([(0, 5)], None, [(0, 3)], [2**62 + 1], 60),  # a reward bucket past 62 bits
        ([(0, 5)], None, [], [], 2**41),  # a window past 40 bits
        ([[0, 5]], None, [], [], 60),  # an interval that is not a tuple
    ],
)
def test_the_c_activity_loop_declines_what_does_not_fit(active: list[Any], first: int | None, members: list[Any],
                                                        rewards: list[int], window: int) -> None:
    """Inputs it cannot take: the C loop returns None and changes nothing; the Python loop takes them."""
    native = _native("activity_deltas")
    out: dict[str, dict[int, int]] = {"A": {1: 1}}
    windows = ((window, "both:x", "newact:x", "actmem:x"),)
    assert native(out, active, first, None, members, rewards, windows, 0, 1) is None
    assert out == {"A": {1: 1}}


@st.composite
def _cohort_case(draw: st.DrawFn) -> tuple[Any, ...]:
    """A customer's cohort inputs as the facts give them: month bounds, first activity, month summaries."""
    bucket_ms = draw(st.sampled_from((60_000, 7 * 60_000, 3_600_000, 86_400_000)))
    cohort = draw(st.integers(-3, 700))
    bounds = metrics_customer.month_bounds(bucket_ms, cohort)
    first = draw(st.integers(bounds[0], bounds[1] - 1))
    span = bounds[-1] - bounds[0]
    bucket = st.integers(bounds[0] - span // 6, bounds[-1] + span // 12)
    active = normalise([(start, start + length)
                        for start, length in draw(st.lists(st.tuples(bucket, st.integers(1, span // 4)), max_size=3))])
    time = bucket.flatmap(lambda b: st.integers(b * bucket_ms, (b + 1) * bucket_ms - 1))
    months = draw(st.dictionaries(
        st.integers(cohort - 2, cohort + metrics_customer.COHORT_PERIODS + 1),
        st.tuples(st.one_of(st.just(MINUS_INFINITY), time), st.one_of(st.just(MINUS_INFINITY), time),
                  st.one_of(st.just(PLUS_INFINITY), time)),
        max_size=6))
    horizon = draw(st.integers(1, span // 3))
    since = draw(st.one_of(st.just(MINUS_INFINITY), st.integers(bounds[0] - span // 6, bounds[-1] - 2)))
    return (first, cohort, bounds, metrics_customer.cohort_series(cohort), active, sorted(months.items()), bucket_ms,
            horizon, since, draw(st.sampled_from((1, -1))))


@settings(max_examples=400, deadline=None)
@given(case=_cohort_case(), earlier=_MESSAGE_DELTAS)
def test_the_c_cohort_loop_adds_what_the_python_loop_adds(case: tuple[Any, ...],
                                                          earlier: dict[str, dict[int, int]]) -> None:
    """metrics._blocks.cohort_deltas adds the Python loop's deltas into a message's deltas, in its order."""
    _assert_loops_agree("cohort_deltas", metrics_customer._cohort_deltas, earlier, case)


@pytest.mark.parametrize(
    ("first", "summary", "since"),
    [
        (2**62 + 1, (0, MINUS_INFINITY, PLUS_INFINITY), 0),  # a first activity past 62 bits
        (3, (2**63, MINUS_INFINITY, PLUS_INFINITY), 0),  # an activity time past int64
        (3, [0, MINUS_INFINITY, PLUS_INFINITY], 0),  # a summary that is not a tuple
        (3, (0, MINUS_INFINITY, PLUS_INFINITY), 10**9),  # every run ends before since (the caller's precondition)
    ],
)
def test_the_c_cohort_loop_declines_what_does_not_fit(first: int, summary: Any, since: int) -> None:
    """Inputs it cannot take: the C loop returns None and changes nothing; the Python loop takes them."""
    native = _native("cohort_deltas")
    out: dict[str, dict[int, int]] = {"A": {1: 1}}
    bounds = metrics_customer.month_bounds(86_400_000, 0)
    assert native(out, first, 0, bounds, metrics_customer.cohort_series(0), [(3, 40)], [(0, summary)], 86_400_000,
                  30, since, 1) is None
    assert out == {"A": {1: 1}}


@st.composite
def _segment_case(draw: st.DrawFn) -> tuple[Any, ...]:
    """A customer's segment inputs as the facts give them: NPS segments clipped at since, active intervals,
    order buckets, the second order and nonzero revenue."""
    since = draw(st.one_of(st.just(MINUS_INFINITY), st.integers(-200, 500)))
    groups = draw(st.lists(st.sampled_from((0, 1, 2)), max_size=3, unique=True))
    segments = []
    for group in groups:
        clipped = [(max(start, since), end) for start, end in draw(_INTERVALS) if end > since]
        if clipped:
            segments.append((group, clipped))
    active = [(start, end) for start, end in draw(_INTERVALS) if start > MINUS_INFINITY and end < PLUS_INFINITY]
    orders = sorted(draw(st.sets(st.integers(-120, 450), max_size=8)))
    second = draw(st.one_of(st.none(), st.integers(-120, 450)))
    revenue = sorted(draw(st.dictionaries(st.integers(-120, 450), st.one_of(
        st.integers(-999, 999), st.integers(-(2**58), 2**58)).filter(bool), max_size=6)).items())
    windows = draw(st.lists(st.integers(0, 120), min_size=1, max_size=4, unique=True).map(tuple))
    return (segments, active, orders, second, revenue, metrics_customer._segment_windows(windows), since,
            draw(st.sampled_from((1, -1))), draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=400, deadline=None)
@given(case=_segment_case(), earlier=_MESSAGE_DELTAS)
@example(case=([(2, [(5, 45)]), (0, [(45, PLUS_INFINITY)])], [(0, 40)], [3, 30, 31], 30, [(3, 700), (31, -200)],
               metrics_customer._segment_windows((10, 20)), 5, 1, True, True), earlier={})
def test_the_c_segment_loop_adds_what_the_python_loop_adds(case: tuple[Any, ...],
                                                           earlier: dict[str, dict[int, int]]) -> None:
    """metrics._blocks.segment_deltas adds the Python loop's deltas into a message's deltas, in its order."""
    _assert_loops_agree("segment_deltas", metrics_customer._segment_deltas, earlier, case)


@pytest.mark.parametrize(
    ("segment", "orders", "revenue", "window"),
    [
        ((2, [(0, 2**62 + 1)]), [], [], 60),  # a segment end past 62 bits
        ((3, [(0, 5)]), [], [], 60),  # a group that is no NPS group
        ((2, [[0, 5]]), [], [], 60),  # an interval that is not a tuple
        ((2, [(0, 5)]), [2**63], [], 60),  # an order bucket past int64
        ((2, [(0, 5)]), [], [(3, 2**61), (4, 2**61 + 1)], 60),  # revenue whose sums may pass 62 bits
        ((2, [(0, 5)]), [], [], 2**41),  # a window past 40 bits
    ],
)
def test_the_c_segment_loop_declines_what_does_not_fit(segment: Any, orders: list[int], revenue: list[Any],
                                                       window: int) -> None:
    """Inputs it cannot take: the C loop returns None and changes nothing; the Python loop takes them."""
    native = _native("segment_deltas")
    out: dict[str, dict[int, int]] = {"A": {1: 1}}
    windows = ((window, tuple(("cs", "both", "P", "ret", "rev") for _ in range(3))),)
    assert native(out, [segment], [(0, 5)], orders, None, revenue, windows, 0, 1, True, True) is None
    assert out == {"A": {1: 1}}


#: one delta added: a series of the facts stage's names, a bucket (negative ones too), a delta that is small,
#: near int64's bounds or past them
_ADDS = st.lists(st.tuples(
    st.sampled_from(("A", "F", "P:60", "segP:2:60", "crev:1440")),
    st.integers(-2048, 2048),
    st.one_of(st.integers(-3, 3), st.sampled_from((2**63 - 1, -(2**63), 2**62, -(2**62))),
              st.integers(-(2**70), 2**70)),
), max_size=120)


@settings(max_examples=400, deadline=None)
@given(adds=_ADDS)
@example(adds=[("A", 1, 2**63 - 1), ("A", 1, 1), ("A", 1, -1), ("A", 1, -(2**63) + 1)])  # out of int64 and back to 0
@example(adds=[("A", 1, -(2**63)), ("A", 1, -1), ("A", 2, 5), ("A", 1, 2**63 + 1)])
def test_the_accumulator_sums_what_a_dict_of_dicts_sums(adds: list[tuple[str, int, int]]) -> None:
    """DeltaAccumulator's rows are grouped_rows of the dict the same add_delta calls build: exact, in order."""
    accumulator = _native("DeltaAccumulator")()
    by_dict: dict[str, dict[int, int]] = {}
    for series, bucket, delta in adds:
        metrics_customer.add_delta(accumulator, series, bucket, delta)
        metrics_customer.add_delta(by_dict, series, bucket, delta)
    assert accumulator.rows() == metrics_customer._grouped_rows(by_dict)
    assert accumulator.as_dict() == {series: {bucket: delta for bucket, delta in buckets.items() if delta}
                                     for series, buckets in by_dict.items() if any(buckets.values())}
    # added in one call, the same
    again = _native("DeltaAccumulator")()
    again.add_deltas(by_dict)
    assert again.rows() == accumulator.rows()


def test_the_accumulator_holds_many_buckets_and_series() -> None:
    """Thousands of buckets in a series and hundreds of series (its tables grown many times) sum as a dict does."""
    accumulator = _native("DeltaAccumulator")()
    by_dict: dict[str, dict[int, int]] = {}
    for step in range(30_000):
        series, bucket, delta = f"s{step % 300}", (step * 7919) % 20_011 - 10_000, step % 5 - 2
        accumulator.add(series, bucket, delta)
        metrics_customer.add_delta(by_dict, series, bucket, delta)
    assert accumulator.rows() == metrics_customer._grouped_rows(by_dict)


def test_the_accumulator_refuses_what_is_not_a_delta() -> None:
    """A name that is no str, a bucket past int64 or a delta that is no int is an error, and adds nothing."""
    accumulator = _native("DeltaAccumulator")()
    with pytest.raises(TypeError):
        accumulator.add(b"A", 1, 1)
    with pytest.raises(OverflowError):
        accumulator.add("A", 2**63, 1)
    with pytest.raises(TypeError):
        accumulator.add("A", 1, 1.5)
    with pytest.raises(TypeError):
        accumulator.add_deltas({"A": [1, 2]})
    with pytest.raises(TypeError):
        _native("DeltaAccumulator")(1)
    assert accumulator.rows() == []


@pytest.mark.parametrize("amount", [2**70, 5], ids=["revenue past int64", "small revenue"])
@pytest.mark.parametrize("loops", ["C", "Python"])
def test_contributions_into_the_accumulator_equal_those_into_a_dict(amount: int, loops: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """add_contributions into the accumulator gives a dict's rows, whether the C loops or the Python loops add them."""
    _native("DeltaAccumulator")
    if loops == "Python":  # as when a C loop declines: the Python loop adds into a dict, then into the accumulator
        for name in ("_NATIVE_ORDER_DELTAS", "_NATIVE_ACTIVITY_DELTAS", "_NATIVE_COHORT_DELTAS"):
            monkeypatch.setattr(metrics_customer, name, None)
    grid = metrics_customer.Grid(60_000, 86_400_000, (3_600_000, 86_400_000))
    facts = metrics_customer.CustomerFacts()
    facts.activity = {3: 200_000, 50: 3_000_000}
    facts.first_activity_ms = 200_000
    facts.orders = {3: 200_000}
    facts.order_count = 1
    facts.first_orders = [200_000]
    facts.revenue = {3: amount}
    families = metrics_customer.ACTIVITY_FAMILY | metrics_customer.ORDER_FAMILY
    accumulator = _native("DeltaAccumulator")()
    by_dict: dict[str, dict[int, int]] = {}
    for out in (accumulator, by_dict):
        facts.add_contributions(grid, families, 0, out, 1)
    rows = accumulator.rows()
    assert rows == metrics_customer.grouped_rows(by_dict)
    # the churned revenue of the 60-bucket window: +amount from bucket 63, -amount from 123
    assert rows[rows.index("crev:60") + 1] == [63, amount, 123, -amount]
    # and taking them away again leaves nothing
    facts.add_contributions(grid, families, 0, accumulator, -1)
    assert accumulator.rows() == []


def test_the_c_grouping_refuses_what_is_not_deltas() -> None:
    """A value that is not a dict of dicts of ints is a TypeError, not a crash."""
    native = _native("grouped_rows")
    with pytest.raises(TypeError):
        native([])
    with pytest.raises(TypeError):
        native({"A": [1, 2]})
    with pytest.raises(TypeError):
        native({"A": {1: "2"}})

    class Shifty(int):
        def __bool__(self) -> bool:
            raise RuntimeError("a delta with a mind of its own")

    with pytest.raises(TypeError):
        native({"A": {1: Shifty(1)}})


#: a dense block of each type, filled near its type's bounds (int64 sums leave int64 on the way)
_DENSE_BLOCKS = st.sampled_from(("b", "h", "i", "q")).flatmap(
    lambda code: st.lists(
        st.integers(-(metrics_store._TYPE_BOUNDS[code]), metrics_store._TYPE_BOUNDS[code] - 1),
        min_size=0, max_size=1024,
    ).map(lambda values: array(code, values))
)


@settings(max_examples=300, deadline=None)
@given(block=_DENSE_BLOCKS, start=st.integers(0, 1100), stop=st.integers(0, 1100))
@example(block=array("q", [2**63 - 1] * 4), start=0, stop=4)
@example(block=array("q", [-(2**63)] * 3 + [5]), start=0, stop=1024)
@example(block=array("q", [2**63 - 1, 1, -(2**63), -1]), start=0, stop=4)  # out of int64 and back: -1
def test_the_c_slot_sum_sums_what_a_slice_sums(block: array[int], start: int, stop: int) -> None:
    """metrics._blocks.dense_sum is sum(block[start:stop]) exactly, past int64 too, and leaves the block as it was."""
    native = _native("dense_sum")
    original = array(block.typecode, block)
    assert native(block, start, stop) == sum(block[start:stop])
    assert block == original


def test_the_c_slot_sum_leaves_other_blocks_to_python() -> None:
    """A sparse block, one past int64, bytes or a strided view give None (Python sums them); a negative bound fails."""
    native = _native("dense_sum")
    assert native({0: 1}, 0, 1) is None
    assert native([2**64, 1], 0, 2) is None
    assert native(b"\x01\x02", 0, 2) is None
    assert native(array("d", [1.0]), 0, 1) is None
    assert native(memoryview(array("b", [1, 2, 3, 4]))[::2], 0, 2) is None  # not contiguous
    with pytest.raises(ValueError):
        native(array("b", [1]), -1, 1)
    with pytest.raises(TypeError):
        native(array("b", [1]), 0)
