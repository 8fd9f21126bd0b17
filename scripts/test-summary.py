"""Sum the results of every suite that scripts/test.sh ran into one line.

Reads vitest's JSON reports and pytest's JUnit XML from the folder given as
the only argument, prints a per-suite table and a final
"N passed, N failed, N skipped" line; exits 1 on a failure or on no tests.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def vitest_counts(path: Path) -> tuple[int, int, int]:
    report = json.loads(path.read_text())
    passed = int(report.get("numPassedTests", 0))
    failed = int(report.get("numFailedTests", 0)) + int(report.get("numRuntimeErrorTestSuites", 0))
    skipped = int(report.get("numPendingTests", 0)) + int(report.get("numTodoTests", 0))
    return passed, failed, skipped


def junit_counts(path: Path) -> tuple[int, int, int]:
    root = ET.parse(path).getroot()  # noqa: S314 - our own pytest output
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    folder = Path(argv[1])
    rows: list[tuple[str, tuple[int, int, int]]] = []
    for report in sorted(folder.glob("vitest-*.json")):
        rows.append((report.stem, vitest_counts(report)))
    for report in sorted(folder.glob("*.xml")):
        rows.append((report.stem, junit_counts(report)))
    print("\nsuite                          passed  failed  skipped")
    for name, (p, f, s) in rows:
        print(f"{name:<30} {p:>6}  {f:>6}  {s:>7}")
    passed = sum(r[1][0] for r in rows)
    failed = sum(r[1][1] for r in rows)
    skipped = sum(r[1][2] for r in rows)
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped")
    if passed == 0:
        print("error: no test ran", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
