#!/usr/bin/env python3
"""Side by side, in one invocation: the four bundle extractions of a cold run
(project_host, project, tools, Node) started at once, as the engine does, in
three ways: as threads of one process running extract_safely (before issue
15), through extract_in_worker (one python3 per extraction, what installs do
now), and GNU tar (`tar -x` with xz/zstd, no checks: the reference floor);
for each archive set given (e.g. .tar.xz and .tar.zst of the same bundles).

Reports, per way: wall seconds and CPU-seconds (ours: this process and its
waited-for children, user + system), and the machine's CPU-seconds over the
same interval (/proc/stat) with the part that was not ours, since another
process on a small machine changes the figures. Rounds alternate the order
of the ways; every extraction goes into a new directory (nothing is deleted
until the end: creating files right after a mass deletion is much dearer on
some file systems).

Usage: extract-bench.py --label xz A1 A2 A3 A4 --label zstd B1 B2 B3 B4 [--rounds 3] [--dir DIR] [--json OUT]
(the dir is created and removed at the end, with everything in it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import bootstrap


def machine_cpu_s() -> float:
    """CPU-seconds the whole machine spent (not idle, not iowait) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def our_cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def gnu_tar(archive: Path, dest: Path) -> None:
    flag = "--zstd" if bootstrap.archive_compression(archive) == "zst" else "-J"
    subprocess.run(["tar", "-x", flag, "--strip-components=1", "-f", str(archive), "-C", str(dest)], check=True)


WAYS = {
    "threads": lambda a, d: bootstrap.extract_safely(a, d, strip=1),
    "workers": lambda a, d: bootstrap.extract_in_worker(a, d, strip=1),
    "gnu-tar": gnu_tar,
}


def one(way: str, archives: list[Path], base: Path) -> dict[str, float]:
    dests = []
    for a in archives:
        d = base / f"{a.name}-{way}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        dests.append(d)
    errors: list[BaseException] = []

    def run(a: Path, d: Path) -> None:
        try:
            WAYS[way](a, d)
        except BaseException as e:  # reported below
            errors.append(e)

    os.sync()
    m0, c0, t0 = machine_cpu_s(), our_cpu_s(), time.monotonic()
    threads = [threading.Thread(target=run, args=(a, d)) for a, d in zip(archives, dests, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, ours, machine = time.monotonic() - t0, our_cpu_s() - c0, machine_cpu_s() - m0
    if errors:
        raise errors[0]
    return {"wall_s": wall, "cpu_s": ours, "machine_cpu_s": machine, "not_ours_cpu_s": max(0.0, machine - ours)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", nargs="+", action="append", required=True, metavar=("LABEL", "ARCHIVE"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to extract (default: a new directory in /var/tmp)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sets = {group[0]: [Path(p) for p in group[1:]] for group in args.label}
    results: dict[str, list[dict[str, float]]] = {}
    if args.dir is None:
        args.dir = Path(tempfile.mkdtemp(prefix="extract-bench-", dir="/var/tmp"))  # not /tmp: often tmpfs
    args.dir.mkdir(parents=True, exist_ok=True)
    ways = list(WAYS)
    try:
        for r in range(args.rounds):
            order = ways if r % 2 == 0 else list(reversed(ways))
            for label, archives in sets.items():
                for way in order:
                    got = one(way, archives, args.dir)
                    results.setdefault(f"{label} {way}", []).append(got)
                    print(f"round {r + 1} {label:6} {way:8} " + " ".join(f"{k}={v:.1f}" for k, v in got.items()))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\n{'':16} {'wall s (median, min-max)':>26} {'CPU-s ours':>12} {'machine CPU-s':>14} {'not ours':>9}")
    for key, runs in results.items():
        walls = [x["wall_s"] for x in runs]
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(
            f"{key:16} {med['wall_s']:10.1f} ({min(walls):.1f}-{max(walls):.1f})      "
            f"{med['cpu_s']:12.1f} {med['machine_cpu_s']:14.1f} {med['not_ours_cpu_s']:9.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
