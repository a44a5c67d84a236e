"""The generated documentation is what its generator writes from the result files it is made from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_page_is_generated_from_its_result_files() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmarks_table.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
