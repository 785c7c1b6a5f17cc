"""Running a test class under the Triton interpreter in a child pytest.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the tests that run real
Triton kernels on CPU tensors live in a class of their own, skipped in the parent and
run by a child process with the variable set (one BLAS thread: the interpreter is
single-threaded numpy, and CI has two cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str, test_class: str, tmp_path: Path, *, min_tests: int,
                    timeout: int) -> None:  # fmt: skip
    """Run ``test_file::test_class`` in a child with the interpreter on; fail unless it
    passed at least ``min_tests`` tests with none failed, errored or skipped."""
    report = tmp_path / "interp.xml"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", f"{test_file}::{test_class}", "-q",
           "-p", "no:cacheprovider", f"--junitxml={report}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert counts["tests"] >= min_tests, counts
