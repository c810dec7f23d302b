import json
import subprocess
import sys

import pytest

# A fresh parent (this test process's own peak may already be high from earlier tests) that
# grows by 768 MB, then starts a small child.
PARENT = """
import json, subprocess, sys
from sparsetorch.evaluate.memory import peak_rss_bytes
before = peak_rss_bytes()
ballast = b"\\x01" * (768 * 2**20)  # written, so resident
parent = peak_rss_bytes()
code = "from sparsetorch.evaluate.memory import peak_rss_bytes; print(peak_rss_bytes())"
child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
print(json.dumps({"before": before, "parent": parent, "child": child}))
"""


def test_a_child_process_reports_its_own_peak_not_its_parents():
    out = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, check=True).stdout
    peaks = json.loads(out)
    assert peaks["parent"] >= peaks["before"] + 700 * 2**20
    assert 0 < peaks["child"] < peaks["parent"] - 700 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_fix_mmap_threshold_takes_on_glibc():
    code = ("from sparsetorch.malloc import fix_mmap_threshold as f; import sys; "
            "sys.exit(0 if f() and f(64 * 1024) else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # its own process: a process-wide setting
