"""Coverage-guided fuzzing of the upload path with atheris (libFuzzer for Python).

Feeds mutated bytes to ``common.inference.images.load_for_model``, the function every upload and
download goes through. Any exception other than the service's own 4xx ApiErrors is a finding, as is
a crash of a C decoder (libFuzzer reports it) or an input slower than ``-timeout`` seconds. The
corpus starts from one image of every accepted format (tests/fuzzing.py).

    make fuzz                                  # installs atheris, runs 5 minutes
    .venv/bin/python scripts/fuzz_upload.py -max_total_time=60 -timeout=2 build/fuzz/corpus

libFuzzer's own flags pass through (-runs, -max_total_time, -timeout, -jobs ...).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from common.config import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from scripts import cli  # noqa: E402


def write_corpus(folder: str) -> int:
    """One file per seed image; returns how many were written."""
    import fuzzing
    os.makedirs(folder, exist_ok=True)
    seeds = fuzzing.seeds()
    for name, data in seeds.items():
        with open(os.path.join(folder, f"seed-{name}"), "wb") as fh:
            fh.write(data)
    return len(seeds)


def make_target(size=(64, 64), max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """The function libFuzzer calls with each input."""
    from common.errors import ApiError
    from common.inference.images import DecodeLimits, load_for_model

    def test_one_input(data: bytes) -> None:
        try:
            array, _ = load_for_model(data, size, limits=DecodeLimits(max_pixels))
        except ApiError as err:
            if not 400 <= err.status < 500:
                raise
            return
        if array.shape != (*size, 3) or not (0.0 <= float(array.min()) <= float(array.max())
                                              <= 1.0):
            raise AssertionError(f"bad model input: shape {array.shape}")

    return test_one_input


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False,
                                verbose_flag=False)
    parser.add_argument("--corpus", default=os.path.join(ROOT, "build", "fuzz", "corpus"))
    args, rest = parser.parse_known_args(argv[1:])
    import warnings
    warnings.simplefilter("ignore")  # Pillow warns about every damaged header
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); `make fuzz` installs it",
              file=sys.stderr)
        return 2
    print(f"corpus {args.corpus}: {write_corpus(args.corpus)} seed images", file=sys.stderr)
    target = make_target()
    atheris.instrument_all()  # Pillow and our code were imported already (the corpus needs PIL)
    atheris.Setup([argv[0], *rest, args.corpus], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
