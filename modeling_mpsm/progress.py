"""Progress bars that read well both in a terminal and in a log file.

In a terminal, `progress_bar` is `tqdm.auto.tqdm`. When stderr is not a terminal (`make main > log`, CI, a job
scheduler), a redrawn bar would fill the file with carriage returns and cursor moves; there the bar is printed as one
plain line at most every `LOG_INTERVAL` seconds (and once when it ends), e.g.
`training:  40%|####      | 200/500 [00:41<01:02,  4.8it/s, loss=12.3]`.
"""

import re
import sys

from tqdm.auto import tqdm


LOG_INTERVAL = 30.0  # seconds between two lines of one bar in a log file
_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")


class _LineStream:
    """A text stream for tqdm that turns each redraw into one line (carriage returns and cursor moves removed)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = _CONTROL.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, as plain lines every `LOG_INTERVAL` s when stderr is not a terminal."""
    if not kwargs.get("disable") and not sys.stderr.isatty():
        kwargs = {"mininterval": LOG_INTERVAL, "ascii": True, "dynamic_ncols": False, "ncols": 100, **kwargs,
                  "file": _LineStream(sys.stderr)}
    return tqdm(iterable, **kwargs)
