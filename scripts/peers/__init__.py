"""The peer services scripts/bench_peers.py runs beside ours, each from its own virtualenv."""
