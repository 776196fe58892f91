"""The bench's picture: throughput of each message shape against its ceilings and the peer, and latency over time.

    python -m bench.plot RESULTS.json [OUT.png]

``loyalty bench`` writes it beside its JSON; this command draws it again from any results file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

#: the bars of a shape, in order: results key -> label
BARS = {
    "worker": "this worker (every metric)",
    "quix_streams_peer": "Quix Streams peer (1 state update/event)",
    "empty_faust_agent": "empty Faust agent",
    "raw_aiokafka": "raw aiokafka + orjson",
}


def throughput_bars(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per shape, ``(label, events/s)`` of each bar that the results have, in :data:`BARS` order.

    >>> throughput_bars({"shapes": {"500": {"worker": {"events_per_s": 10.0}, "raw_aiokafka": {"events_per_s": 90}}}})
    [('500 events/message', [('this worker (every metric)', 10.0), ('raw aiokafka + orjson', 90.0)])]
    """
    shapes = []
    for batch, shape in results.get("shapes", {}).items():
        label = "1 event/message" if batch == "1" else f"{batch} events/message"
        bars = [(name, float(shape[key]["events_per_s"])) for key, name in BARS.items() if key in shape]
        shapes.append((label, bars))
    return shapes


def plot(results: dict[str, Any], path: Path) -> Path:
    """Draw the results to ``path`` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    shapes = throughput_bars(results)
    runs = results.get("latency", {}).get("runs", [])
    panels = 1 + (1 if runs else 0)
    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
    left = axes[0][0]
    colours = ["#1f77b4", "#ff7f0e", "#7f7f7f", "#c7c7c7"]
    width = 0.8 / max(1, len(BARS))
    names = list(BARS.values())
    labelled: set[str] = set()
    for index, (_, bars) in enumerate(shapes):
        for name, value in bars:
            position = index + (names.index(name) - (len(BARS) - 1) / 2) * width
            left.bar(position, value, width, color=colours[names.index(name)],
                     label=None if name in labelled else name)
            labelled.add(name)
            left.annotate(f"{value:,.0f}", (position, value), ha="center", va="bottom", fontsize=7, rotation=90)
    left.set_xticks(range(len(shapes)), [label for label, _ in shapes])
    left.set_yscale("log")
    left.set_ylabel("events/s (log scale)")
    left.set_title("throughput, one worker")
    left.legend(fontsize=8, loc="upper left")
    if runs:
        right = axes[0][1]
        for number, run in enumerate(runs, start=1):
            seconds = [point["second"] for point in run["over_time"]]
            colour = f"C{number - 1}"  # a run's p50 (dotted) in the colour of its p99
            right.plot(seconds, [point["p99_s"] * 1000 for point in run["over_time"]], color=colour,
                       label=f"run {number}: p99")
            right.plot(seconds, [point["p50_s"] * 1000 for point in run["over_time"]], color=colour, linestyle=":",
                       label=f"run {number}: p50")
        right.axhline(500, color="red", linewidth=0.8, label="500 ms target (p99)")
        right.set_xlabel("second of sending")
        right.set_ylabel("produce to Redis (ms)")
        right.set_title(f"latency at {runs[0]['rate_target']:,.0f} events/s")
        right.legend(fontsize=7)
    machine = results.get("machine", {})
    figure.suptitle(f"loyalty bench {results.get('date', '')[:10]}: {machine.get('cores', '?')} cores, "
                    f"metrics {machine.get('metrics_implementation', '?')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line: the PNG of a results file."""
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source = Path(args[0])
    target = Path(args[1]) if len(args) == 2 else source.with_suffix(".png")
    print(plot(orjson.loads(source.read_bytes()), target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
