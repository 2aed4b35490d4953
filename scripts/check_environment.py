#!/usr/bin/env python3
"""Check a Python environment: one TensorFlow, and no file installed by two distributions.

``tensorflow-hub`` requires ``tf-keras``, which requires the full ``tensorflow`` distribution;
installed beside ``tensorflow-cpu``, both write into the same ``tensorflow/`` folder and the last
one installed silently wins. This script reads every installed distribution's file list (its RECORD,
through ``importlib.metadata``) and reports which distributions own ``tensorflow/`` and which files
more than one distribution claims. Standard library only, so it also runs inside the Docker image
(``docker run -i IMAGE python - < scripts/check_environment.py``).

Exit status 0 when exactly one distribution owns ``tensorflow/`` and no file is shared.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections import defaultdict


def file_owners() -> dict[str, list[str]]:
    """Absolute path of every installed file -> the distributions whose RECORD lists it."""
    owners: dict[str, set[str]] = defaultdict(set)
    for dist in importlib.metadata.distributions():
        for entry in dist.files or ():
            path = os.path.realpath(str(dist.locate_file(entry)))
            owners[path].add(dist.metadata["Name"])
    return {path: sorted(names) for path, names in owners.items()}


def package_owners(package: str) -> list[str]:
    """The distributions that install the top-level package ``package`` (its __init__.py)."""
    return sorted({dist.metadata["Name"] for dist in importlib.metadata.distributions()
                   for entry in dist.files or () if entry.parts == (package, "__init__.py")})


def check() -> dict:
    """``{"tensorflow": [owners], "shared": {path: [owners]}}`` of this environment."""
    shared = {path: names for path, names in file_owners().items() if len(names) > 1}
    return {"tensorflow": package_owners("tensorflow"), "shared": shared}


def main() -> int:
    report = check()
    print(json.dumps({"tensorflow": report["tensorflow"], "shared_files": len(report["shared"]),
                      "shared_examples": dict(list(report["shared"].items())[:5])}, indent=1))
    return 0 if len(report["tensorflow"]) == 1 and not report["shared"] else 1


if __name__ == "__main__":
    sys.exit(main())
