"""Figures measured by the reliability tests, kept for docs/RELIABILITY.md.

Each test that measures something calls ``record(name, figures)``; the figures land in
``build/reliability/<name>.json`` and ``scripts/reliability_report.py`` turns the last run's
files into the tables of docs/RELIABILITY.md.
"""
import json
import os
import time

from helpers import ROOT

RESULTS_DIR = os.path.join(ROOT, "build", "reliability")


def record(name: str, figures: dict) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    figures = {**figures, "recorded": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as fh:
        json.dump(figures, fh, indent=1, default=str)
