#!/usr/bin/env python
"""Run each tests/test_*.py in its own pytest process and print one summary line.

    python tools/run_tests.py tests [pytest args...]

Exit code: 0 when every file passed, 1 when any failed or when no test ran at all (pytest's "no tests
collected", exit code 5, counts as a failure).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "tests")
    extra = argv[1:]
    files = sorted(root.glob("test_*.py"))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    bad = []
    t0 = time.time()
    for f in files:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(f), *extra],
                             capture_output=True, text=True)
        tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        for key in totals:
            m = re.search(rf"(\d+) {key[:-1] if key == 'errors' else key}", tail)
            if m:
                totals[key] += int(m.group(1))
        print(f"{f.name:40s} {tail}", flush=True)
        if out.returncode != 0:
            bad.append(f.name)
            print(out.stdout[-6000:], out.stderr[-3000:], sep="\n", flush=True)
    ran = totals["passed"] + totals["failed"]
    print(f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
          f" in {time.time() - t0:.0f} s ({len(files)} files)")
    if bad:
        print("failing files: " + ", ".join(bad))
    return 1 if bad or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
