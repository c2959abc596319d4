"""Progress bars in a log file: plain lines, no carriage returns or cursor moves (modeling_mpsm/common.py)."""

import subprocess
import sys


def test_bars_into_a_file_are_plain_lines():
    script = (
        "from modeling_mpsm.common import progress_bar\n"
        "for _ in progress_bar(range(500), desc='training', mininterval=0):\n"
        "    pass\n"
        "with progress_bar(total=2, desc='scoring') as bar:\n"
        "    bar.update(2)\n"
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr
    assert lines[0].startswith("training:   0%") and all(line.startswith(("training:", "scoring:")) for line in lines)
    assert any(line.startswith("training: 100%") and "500/500" in line for line in lines)
    assert lines[-1].startswith("scoring: 100%") and "2/2" in lines[-1]
    assert result.stdout == "done\n"
