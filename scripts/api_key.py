#!/usr/bin/env python3
"""Make an API key and its API_KEYS_FILE line (README "Access control").

    python scripts/api_key.py --name ci --scopes classify
    python scripts/api_key.py --name ops --scopes classify+feedback+admin >> keys.txt   # line only
    printf %s "$OLD_KEY" | python scripts/api_key.py --name ci --scopes classify --hash

A new key (``secrets.token_urlsafe(32)``) is printed on stderr, once, for you to hand to the
client; stdout gets only the file line ``name:sha256:<hex>:scope+scope``, so ``>> keys.txt``
appends it. ``--hash`` reads an existing key from stdin instead of making one. The server
re-reads API_KEYS_FILE within a second or two of a change: append the new line, give the client
its new key, then delete the old line.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.keys import SCOPES, KeyConfigError, file_line, new_key  # noqa: E402
from scripts import cli  # noqa: E402


def make_entry(name: str, scopes: str, key: str | None = None) -> tuple[str, str]:
    """(the key, its API_KEYS_FILE line): a new random key unless ``key`` is given.
    KeyConfigError when the name, scopes or key cannot be used (the message never holds the
    key)."""
    key = new_key() if key is None else key
    return key, file_line(name, key, scopes.split("+"))


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--name", required=True,
                        help="the key's name (logs and the audit trail show it)")
    parser.add_argument("--scopes", default="classify",
                        help=f"scopes joined by '+', of: {', '.join(SCOPES)} (default classify)")
    parser.add_argument("--hash", action="store_true",
                        help="hash the key read from stdin instead of making a new one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = sys.stdin.read().strip() if args.hash else None
    try:
        key, line = make_entry(args.name, args.scopes, key)
    except KeyConfigError as exc:
        print(f"api_key.py: {exc}", file=sys.stderr)
        return 2
    if not args.hash:
        print(f"key (give it to the client; it is not stored anywhere): {key}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
