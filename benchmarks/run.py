"""Run every benchmark, print the table, write ``benchmarks/results.json``.

Usage: ``python benchmarks/run.py [--output PATH]`` (or ``python -m benchmarks``).
Takes about a minute. Every figure is measured beside its baseline in the same
process and run; the targets are ratios against those baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_client, bench_events
from benchmarks.bench_server import app_cpu, ingest

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"

# Whatever the machine says, the benchmark measures telemetry switched on.
_ENV_THAT_TURNS_TELEMETRY_OFF = ("CI", "DO_NOT_TRACK", "BENCH_TELEMETRY")


class Sizes(NamedTuple):
    """How big each benchmark runs: ``FULL`` for the figures, ``TINY`` for the smoke test."""

    calls_number: int = 200_000
    calls_rounds: int = 5
    contended_calls_per_thread: int = 50_000
    contended_rounds: int = 3
    import_runs: int = 15
    buffer_items: int = 100_000
    encode_rounds: int = 5
    stall_items: int = 100_000
    stall_baseline_s: float = 1.0
    event_calls_number: int = 5_000
    event_calls_rounds: int = 20
    ingest_payloads: int = 3_000
    ingest_threads: int = 4
    app_cpu_payloads: int = 3_000
    spool_files: int = 20_000


FULL = Sizes()
TINY = Sizes(
    calls_number=200,
    calls_rounds=1,
    contended_calls_per_thread=200,
    contended_rounds=1,
    import_runs=1,
    buffer_items=2_000,
    encode_rounds=1,
    stall_items=2_000,
    stall_baseline_s=0.05,
    event_calls_number=200,
    event_calls_rounds=1,
    ingest_payloads=40,
    ingest_threads=2,
    app_cpu_payloads=40,
    spool_files=50,
)


def run_all(sizes: Sizes = FULL, log: Callable[[str], object] = print) -> Dict[str, Any]:
    """Every benchmark once, at ``sizes``; returns the raw results (JSON-ready)."""
    for name in _ENV_THAT_TURNS_TELEMETRY_OFF:
        os.environ.pop(name, None)
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as state_dir:
        bench_client.init_default_client(state_dir)
        log("collection calls (telemetry on) ...")
        results["calls_on"] = bench_client.collection_calls(sizes.calls_number, sizes.calls_rounds)
        log("collection calls (telemetry off) ...")
        with bench_client.consent_off():
            results["calls_off"] = bench_client.collection_calls(
                sizes.calls_number, sizes.calls_rounds
            )
        log("event calls (telemetry on) ...")
        results["events_on"] = bench_events.event_calls(
            sizes.event_calls_number, sizes.event_calls_rounds
        )
        log("event calls (telemetry off) ...")
        with bench_client.consent_off():
            results["events_off"] = bench_events.event_calls(
                sizes.event_calls_number, sizes.event_calls_rounds
            )
        log("4-thread contention ...")
        results["contended"] = bench_client.contended(
            4, sizes.contended_calls_per_thread, sizes.contended_rounds
        )
    log("import time ...")
    results["import"] = bench_client.import_time(sizes.import_runs)
    log("buffer memory ...")
    results["memory"] = bench_client.buffer_memory(sizes.buffer_items)
    log("snapshot + encode ...")
    results["snapshot_encode"] = bench_client.snapshot_encode(
        sizes.buffer_items, sizes.encode_rounds
    )
    log("start_emitting() with a spool far over its bounds ...")
    results["spool_start"] = bench_client.spool_start(sizes.spool_files, wait_for_trim=False)
    log("set_consent(False) with a spool far over its bounds ...")
    results["withdraw_spool"] = bench_client.withdraw_spool(sizes.spool_files)
    log("stall test ...")
    results["stall"] = bench_client.stall_every_shape(sizes.stall_items, sizes.stall_baseline_s)
    log("server ingest ...")
    results["server"] = ingest(sizes.ingest_payloads, sizes.ingest_threads)
    log("server app CPU ...")
    results["server_app_cpu"] = app_cpu(sizes.app_cpu_payloads, threads=8)
    return results


class Row(NamedTuple):
    """One line of the table: a figure, its baseline, their ratio, the target and the verdict."""

    figure: str
    value: str
    baseline: str
    ratio: str
    target: str
    met: Optional[bool]


def _ratio_row(figure: str, value: float, baseline: float, unit: str, limit: float) -> Row:
    ratio = value / baseline
    return Row(figure, f"{value:,.1f} {unit}", f"{baseline:,.1f} {unit}", f"{ratio:.2f}x",
               f"<= {limit:g}x", ratio <= limit)


def _untargeted(name: str) -> bool:
    return name.startswith(("record_raw", "with_attrs"))


def _event_row(figure: str, call: Dict[str, float], limit: Optional[float]) -> Row:
    if limit is not None:
        return _ratio_row(figure, call["ns"], call["floor_ns"], "ns", limit)
    return Row(figure, f"{call['ns']:,.1f} ns", f"{call['floor_ns']:,.1f} ns",
               f"{call['ns'] / call['floor_ns']:.2f}x", "", None)


# Each collection call's target, as a multiple of the lock+dict floor measured beside it:
# counters must beat the floor, every other call stay close to it.
CALL_TARGETS = {"increment": 0.75, "add": 0.75}


def table_rows(results: Dict[str, Any]) -> List[Row]:
    """The figures against their targets, ratios computed from the raw numbers."""
    rows: List[Row] = []
    for name, call in results["calls_on"].items():
        limit = CALL_TARGETS.get(name, 1.25)
        rows.append(_ratio_row(f"{name} (ns/call)", call["ns"], call["floor_ns"], "ns", limit))
    for name, call in results["calls_off"].items():
        rows.append(_ratio_row(f"{name}, off (ns/call)", call["ns"], call["floor_ns"], "ns", 0.3))

    # A log below the threshold costs about what an off call does; a kept event, about
    # what a new counting-set member does. ``record_raw`` (a proxy checking a whole
    # foreign event) and ``with_attrs`` (a constructor) have no target of their own.
    for name, call in results["events_on"].items():
        limit = 0.5 if "below threshold" in name else 3.0
        rows.append(_event_row(f"{name} (ns/call)", call, None if _untargeted(name) else limit))
    for name, call in results["events_off"].items():
        rows.append(_event_row(f"{name}, off (ns/call)", call,
                               None if name.startswith("with_attrs") else 0.5))

    contended = results["contended"]
    ratio = contended["floor_calls_per_s"] / contended["calls_per_s"]
    rows.append(Row(
        f"increment, {contended['threads']} threads (calls/s)",
        f"{contended['calls_per_s']:,}", f"{contended['floor_calls_per_s']:,}",
        f"{ratio:.2f}x", "", None,  # no target of its own: time per call over the floor's
    ))

    imported = results["import"]
    added = imported["import_ms"] - imported["baseline_ms"]
    rows.append(Row(
        "import telemetry (ms, median)", f"{imported['import_ms']:.1f} ms",
        f"{imported['baseline_ms']:.1f} ms", f"+{added:.1f} ms", "<= +30 ms", added <= 30,
    ))

    for name, memory in results["memory"].items():
        rows.append(Row(
            f"buffer, {memory['items']:,} items, {name} (MB)", f"{memory['mb']:.1f} MB",
            "", f"{memory['bytes_per_item']:.0f} B/item", "<= 30 MB", memory["mb"] <= 30,
        ))
    for name, encoded in results["snapshot_encode"].items():
        rows.append(Row(
            f"snapshot+encode, {encoded['items']:,} items, {name}", f"{encoded['ms']:.1f} ms",
            "", "", "<= 150 ms", encoded["ms"] <= 150,
        ))

    spool = results["spool_start"]
    rows.append(Row(
        f"start_emitting() with {spool['files']:,} spooled files", f"{spool['start_ms']:.1f} ms",
        f"{spool['baseline_ms']:.1f} ms", f"+{spool['start_ms'] - spool['baseline_ms']:.1f} ms",
        "<= +5 ms", spool["start_ms"] - spool["baseline_ms"] <= 5,
    ))
    withdrawn = results["withdraw_spool"]
    rows.append(Row(
        f"set_consent(False) with {withdrawn['files']:,} spooled files",
        f"{withdrawn['off_ms']:.1f} ms", f"{withdrawn['baseline_ms']:.1f} ms",
        f"+{withdrawn['off_ms'] - withdrawn['baseline_ms']:.1f} ms",
        "<= +5 ms", withdrawn["off_ms"] - withdrawn["baseline_ms"] <= 5,
    ))

    for shape, stall in results["stall"].items():
        rows += _stall_rows(shape, stall)

    server = results["server"]
    rows.append(Row(
        f"server ingest, 10-key payloads, {server['threads']} threads",
        f"{server['payloads_per_s']:,.0f} /s", "", "", ">= 1,000 /s",
        server["payloads_per_s"] >= 1000 and server["stored"] == server["payloads"],
    ))
    app = results["server_app_cpu"]
    rows.append(Row(
        f"server app CPU per 10-key payload, {app['threads']} threads, SQLite",
        f"{app['cpu_ms_per_payload']:.3f} ms", "", "", "<= 0.25 ms",
        app["cpu_ms_per_payload"] <= 0.25 and not app["failures"],
    ))
    return rows


def _stall_rows(shape: str, stall: Dict[str, Any]) -> List[Row]:
    """The stall test of one buffer shape: p50, p99 and max while emitting, beside alone."""
    during, alone = stall["during_emission"], stall["uncontended"]
    collected = stall["gc_during_emission"]
    p99_ratio = during["p99_us"] / alone["p50_us"]
    return [
        Row(
            f"increment while emitting {stall['items']:,} items, {shape}: p50",
            f"{during['p50_us']:.2f} us", f"{alone['p50_us']:.2f} us",
            f"{during['p50_us'] / alone['p50_us']:.2f}x", "", None,
        ),
        Row(
            "  p99 (vs uncontended p50)", f"{during['p99_us']:.2f} us",
            f"{alone['p50_us']:.2f} us", f"{p99_ratio:.2f}x", "<= 10x", p99_ratio <= 10,
        ),
        Row(
            "  max: the stall (vs uncontended max)", f"{during['max_us'] / 1000:.2f} ms",
            f"{alone['max_us'] / 1000:.2f} ms", "", "<= 5 ms",
            during["max_us"] <= 5000 and stall["delivered"],
        ),
        Row(
            "  calls over 5 ms", f"{during['over_5ms']}", f"{alone['over_5ms']}", "", "", None,
        ),
        Row(
            "  most emitter CPU inside one call", f"{during['max_emitter_cpu_us'] / 1000:.2f} ms",
            "", "", "", None,
        ),
        Row(
            "  garbage collections (full; longest)",
            f"{collected['collections']} ({collected['full']};"
            f" {collected['max_us'] / 1000:.2f} ms)",
            "", "", "", None,
        ),
    ]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table."""
    header = Row("figure", "value", "baseline", "ratio", "target", None)
    cells = [[*row[:5], "met?" if row is header else _verdict(row.met)] for row in [header, *rows]]
    widths = [max(len(line[column]) for line in cells) for column in range(6)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _verdict(met: Optional[bool]) -> str:
    return "" if met is None else ("yes" if met else "NO")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where to write JSON")
    arguments = parser.parse_args(argv)
    began = time.perf_counter()
    results = run_all(FULL, log=lambda message: print(message, file=sys.stderr, flush=True))
    rows = table_rows(results)
    print(format_table(rows))
    elapsed = time.perf_counter() - began
    print(f"\n{sum(row.met is False for row in rows)} target(s) missed; took {elapsed:.0f} s")
    document = {
        "command": "python benchmarks/run.py",
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "seconds": round(elapsed, 1),
        "table": [row._asdict() for row in rows],
        "results": results,
    }
    arguments.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
