"""Fails unless every named tox env wrote a JUnit report with tests run and none failed.

Usage: python check_junit.py JUNIT_DIR ENV...
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(folder: str, envs: list[str]) -> int:
    problems = []
    for env in envs:
        path = Path(folder) / f"{env}.xml"
        if not path.exists():
            problems.append(f"{env}: no JUnit report at {path}")
            continue
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = sum(int(s.get("tests", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
        ran = total - skipped
        print(f"{env}: {total} tests, {ran} ran, {skipped} skipped, {bad} failed or errored")
        if ran <= 0:
            problems.append(f"{env}: no test ran")
        if bad:
            problems.append(f"{env}: {bad} failures or errors")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems or not envs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
