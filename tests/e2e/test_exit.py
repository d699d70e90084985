"""runtime.run_main, every job's `__main__`: leaving without the interpreter's final garbage
collection must not cost a job its output, its exit hooks or its exit code."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mlops_ray.runtime import REPO

pytestmark = pytest.mark.slow  # a process of its own (no Ray)

SCRIPT = """
import atexit, sys
from mlops_ray.runtime import run_main
def main():
    atexit.register(lambda: print("exit hook ran"))
    cycle = {}; cycle["self"] = cycle  # garbage only a collection would find
    print("x" * 200_000)  # buffered: stdout is a pipe
    sys.stderr.write("partial line, no newline")
    if sys.argv[1] != "0":
        sys.exit(int(sys.argv[1]))
run_main(main)
"""


def test_run_main_keeps_output_exit_hooks_and_exit_code():
    for code in (0, 3):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(code)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == code, out.stderr
        assert out.stdout.splitlines() == ["x" * 200_000, "exit hook ran"]
        assert out.stderr.endswith("partial line, no newline")
