import subprocess
import sys

from sparsetorch.evaluate.memory import peak_rss_bytes


def test_a_child_process_reports_its_own_peak_not_its_parents():
    before = peak_rss_bytes()
    ballast = b"\x01" * (768 * 2**20)  # written, so resident
    parent = peak_rss_bytes()
    assert parent >= before + 700 * 2**20
    code = "from sparsetorch.evaluate.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < parent - 700 * 2**20
    del ballast
