"""What every script's command line shares: hyphenated flags, `--verbose`, a quiet TensorFlow.

    from scripts import cli

    parser = cli.ArgumentParser(description="...")      # adds --verbose
    parser.add_argument("--image_dir")                  # --image-dir works too
    args = cli.parse_args(parser, argv)                 # logging + quiet TensorFlow, then args

* :class:`ArgumentParser` accepts ``--image-dir`` wherever ``--image_dir`` is defined (the seed
  tutorial's users typed hyphens); ``--help`` shows the underscore spelling and says so.
* :func:`parse_args` parses, sets up logging (``LEVEL message`` lines on stderr) and calls
  :func:`quiet_tensorflow` with ``args.verbose`` (``tensorflow=False``: a script without it).
* :class:`filtered_stderr` hides such lines around any later step that prints them.
* :func:`quiet_tensorflow` must run before TensorFlow is first imported (the scripts import it
  lazily, after parsing): it keeps TensorFlow's C++ start-up lines (CUDA probing on a machine
  without a GPU, CPU-feature and absl notices) and its Python INFO logs (the SavedModel export's
  list of renamed inputs) out of the terminal. C++ warnings and errors after start-up, Python
  warnings and our own logs stay. ``--verbose`` (or ``TF_CPP_MIN_LOG_LEVEL`` set by the user)
  shows everything.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile

#: Python loggers TensorFlow writes its INFO lines to (the SavedModel export uses absl's).
TENSORFLOW_LOGGERS = ("tensorflow", "absl")
HYPHEN_NOTE = "Every --flag_name may also be spelled --flag-name."

#: stderr lines TensorFlow prints while it starts (import and device discovery), hidden unless
#: --verbose: absl's pre-init notice, INFO lines, CUDA probing on a machine without a GPU, and
#: the CPU-feature notice's second line.
START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} \d+:\d+:\d+\.\d+ "
    r"|[WE]\d{4} \d+:\d+:\d+\.\d+ +\d+ (cuda\w*|cudart_stub|gpu_\w+|dso_loader)\.cc:"
    r"|To enable the following instructions: .* rebuild TensorFlow)")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that also accepts hyphenated spellings of underscore flags
    (``--image-dir`` for ``--image_dir``, also with ``=value`` and as an abbreviation), and has
    a ``--verbose`` flag (``verbose_flag=False`` leaves it out)."""

    def __init__(self, *args, verbose_flag: bool = True, **kwargs):
        epilog = kwargs.get("epilog")
        kwargs["epilog"] = f"{epilog}\n\n{HYPHEN_NOTE}" if epilog else HYPHEN_NOTE
        super().__init__(*args, **kwargs)
        if verbose_flag:
            self.add_argument("--verbose", action="store_true",
                              help="show TensorFlow's own start-up and INFO logs")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.underscored(args), namespace)

    def underscored(self, args: list[str]) -> list[str]:
        """``args`` with each hyphenated flag that names (or abbreviates) one of ours spelled
        with underscores; values, unknown flags and everything after ``--`` are left alone."""
        known = [o for action in self._actions for o in action.option_strings
                 if o.startswith("--")]
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            name, sep, value = arg.partition("=")
            if name.startswith("--") and "-" in name[2:]:
                spelled = "--" + name[2:].replace("-", "_")
                if any(o.startswith(spelled) for o in known):
                    name = spelled
            out.append(name + sep + value)
        return out


def parse_args(parser: argparse.ArgumentParser, argv=None,
               tensorflow: bool = True) -> argparse.Namespace:
    """Parse ``argv``, set up logging and (for a script that uses TensorFlow) start TensorFlow
    quietly, unless ``--verbose``."""
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    if tensorflow:
        quiet_tensorflow(verbose)
    return args


def setup_logging(verbose: bool = False) -> None:
    """``LEVEL message`` lines on stderr at INFO; TensorFlow's Python loggers at WARNING unless
    ``verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    _tensorflow_loggers(logging.INFO if verbose else logging.WARNING)


def _tensorflow_loggers(level: int) -> None:
    """TensorFlow logs through ``tensorflow`` and, in newer modules, absl's ``absl`` logger."""
    for name in TENSORFLOW_LOGGERS:
        logging.getLogger(name).setLevel(level)


def quiet_tensorflow(verbose: bool = False) -> None:
    """Start TensorFlow without its start-up chatter (nothing to do when ``verbose``).

    Sets ``TF_CPP_MIN_LOG_LEVEL=1`` (C++ INFO off; warnings and errors stay) unless the user set
    it, then imports TensorFlow and lists its devices with file descriptor 2 captured: lines
    matching :data:`START_UP_NOISE` are dropped, the rest written back to stderr. When
    TensorFlow is already imported (a library caller), only its Python logger is quietened;
    without TensorFlow installed (a serving environment on ONNX Runtime) nothing is done.
    """
    if verbose:
        return
    _tensorflow_loggers(logging.WARNING)
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with filtered_stderr(START_UP_NOISE):
        try:
            import tensorflow as tf
        except ImportError:  # a serving environment without TensorFlow: nothing to quieten
            return
        tf.config.list_physical_devices()  # the CUDA probe happens here, not at import
    _tensorflow_loggers(logging.WARNING)


class filtered_stderr:
    """``with filtered_stderr(pattern):`` captures file descriptor 2 (C++ and Python writes
    alike) into a temporary file; on exit, writes back the lines that do not match ``pattern``.
    For a noisy step after start-up (a converter's C++ notices), when not ``--verbose``."""

    def __init__(self, noise: re.Pattern = START_UP_NOISE):
        self.noise = noise

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.capture = tempfile.TemporaryFile()
        os.dup2(self.capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.capture.seek(0)
        text = self.capture.read().decode("utf-8", "replace")
        self.capture.close()
        kept = [line for line in text.splitlines(keepends=True) if not self.noise.match(line)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
        return False


def write_json(path: str, data) -> None:
    """A script's result as indented JSON at ``path`` (its folder made when missing)."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
