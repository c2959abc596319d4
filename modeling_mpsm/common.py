"""Helpers every room of the package shares: the data sets' constants, the metric keys, atomic file writes, progress
bars and the command lines' parser. Imports nothing of the package but the self-contained Recall@K metric.

Progress bars read well both in a terminal and in a log file. In a terminal, `progress_bar` is `tqdm.auto.tqdm`.
When stderr is not a terminal (`make main > log`, CI, a job scheduler), a redrawn bar would fill the file with
carriage returns and cursor moves; there the bar is printed as one plain line at most every `LOG_INTERVAL` seconds
(and once when it ends), e.g.
`training:  40%|####      | 200/500 [00:41<01:02,  4.8it/s, loss=12.3]`.
"""

import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .metrics.recall_at_k.ranking import CAPTIONS_PER_IMAGE, RECALL_KS


__all__ = ["CAPTIONS_PER_IMAGE", "HUB_CONFIGS_DIR", "METRIC_KEYS", "RECALL_KS", "ArgumentParser", "argument",
           "atomic_write", "atomic_write_text", "check_arguments", "progress_bar", "report_error"]


# The model-card and dataset-card templates, inside the package (the repository's top-level `hub_configs` points
# here), so that an installed wheel publishes as a source checkout does.
HUB_CONFIGS_DIR = Path(__file__).resolve().parent / "hub_configs"
METRIC_KEYS = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)


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


def atomic_write(path: str, write) -> None:
    """
    `write(temporary_path)`, then `os.replace` of the finished file onto `path`: readers see the old file or the whole
    new one, never a partial file. The temporary file sits beside `path` (same file system) and is removed on failure
    (e.g. a full disk midway).
    """
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(descriptor)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of a UTF-8 text file with `\\n` line ends."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------------------------


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a command-line value may be, by the name a field declares in its metadata ("must_be"): the phrase of the error
# and the test (NaN fails every comparison). Values read from a configuration file are checked too, so types as well.
VALUE_RULES = {
    "positive integer": ("a positive integer", lambda value: _integer(value) and value >= 1),
    "non-negative integer": ("an integer >= 0", lambda value: _integer(value) and value >= 0),
    "positive number": ("a positive number", lambda value: _number(value) and 0 < value < math.inf),
    "positive number or inf": ("a positive number", lambda value: _number(value) and value > 0),
    "non-negative number": ("a number >= 0", lambda value: _number(value) and 0 <= value < math.inf),
    "epochs": ("integers >= 0 (epochs, 0-based)", lambda values: all(_integer(v) and v >= 0 for v in values)),
    "steps or epoch": ("a positive integer or 'epoch'", lambda value: value == "epoch" or (
        not isinstance(value, bool) and str(value).isdigit() and int(value) >= 1)),
}


def argument(default=dataclasses.MISSING, help=None, must_be=None, **metadata):
    """A field of a dataclass of arguments: its default (none: a required flag; a list is copied per instance), help,
    rule of `VALUE_RULES` and other settings of `add_argument` (choices, metavar, ...)."""
    metadata.update({key: value for key, value in (("help", help), ("must_be", must_be)) if value is not None})
    if isinstance(default, list):
        return dataclasses.field(default_factory=default.copy, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ArgumentParser(HfArgumentParser):
    """
    `HfArgumentParser` over one dataclass of arguments whose fields may declare, beside their help and choices, the
    rule of `VALUE_RULES` their value must follow (metadata `"must_be"`), checked by `check_arguments`. Unknown flags
    end with argparse's usage error, as a hand-written parser's do.
    """

    @staticmethod
    def _parse_dataclass_field(parser, field):
        field = copy.copy(field)  # argparse knows no "must_be"
        field.metadata = {key: value for key, value in field.metadata.items() if key != "must_be"}
        HfArgumentParser._parse_dataclass_field(parser, field)
        if "nargs" in field.metadata:  # HfArgumentParser gives a list nargs="+" whatever the field says
            parser._actions[-1].nargs = field.metadata["nargs"]

    def parse(self, argv=None, check=True):
        """The dataclass of arguments of `argv` (default: `sys.argv[1:]`), checked unless `check=False`."""
        arguments = self.dataclass_types[0](**vars(self.parse_args(argv)))
        if check:
            check_arguments(self, arguments)
        return arguments


def check_arguments(parser, arguments) -> None:
    """`parser.error` naming the first flag whose value (not None) breaks the rule its field declares."""
    for field in dataclasses.fields(arguments):
        value = getattr(arguments, field.name)
        if "must_be" in field.metadata and value is not None:
            expected, valid = VALUE_RULES[field.metadata["must_be"]]
            if not valid(value):
                parser.error(f"--{field.name} must be {expected}, got {value!r}.")


def report_error(error: Exception) -> int:
    """
    A command line's end on a bad input (missing or corrupt model, data or checkpoint, settings that do not fit) or an
    I/O failure (read-only or full disk): one line `error: <message>` on stderr instead of a traceback (for a
    `datasets` generation error, its cause, which names the file), and exit status 2. `MPSM_TRACEBACK=1` re-raises.
    """
    from datasets.exceptions import DatasetGenerationError  # the CLIs have imported `datasets` already

    if os.environ.get("MPSM_TRACEBACK"):
        raise error
    cause = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
    print(f"error: {cause}", file=sys.stderr)
    return 2
