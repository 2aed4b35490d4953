"""Views that are handed the DataPlane: module-level functions whose first argument is the
DataPlane, collected with their URL rules as they are defined and bound to one DataPlane when
an adapter's blueprint is built (``Views.bind``). No view looks the DataPlane up."""
from __future__ import annotations

import functools
from typing import Callable

from flask import Blueprint


class Views:
    """The views of one adapter and their rules, in the order they were declared. ``get`` and
    ``post`` decorate a view (several may be stacked, as with Flask's own) and return it
    unchanged, so it stays a plain function that tests can call with a DataPlane."""

    def __init__(self):
        self._rules: list[tuple[Callable, str, str]] = []

    def get(self, rule: str) -> Callable[[Callable], Callable]:
        return self._add(rule, "GET")

    def post(self, rule: str) -> Callable[[Callable], Callable]:
        return self._add(rule, "POST")

    def _add(self, rule: str, method: str) -> Callable[[Callable], Callable]:
        def declare(view: Callable) -> Callable:
            self._rules.append((view, rule, method))
            return view
        return declare

    def bind(self, bp: Blueprint, dataplane) -> Blueprint:
        """Add every view to ``bp`` under its rules, each called with ``dataplane`` first."""
        bound: dict[Callable, Callable] = {}
        for view, rule, method in self._rules:
            if view not in bound:
                bound[view] = functools.update_wrapper(functools.partial(view, dataplane), view)
            bp.add_url_rule(rule, view.__name__, bound[view], methods=[method])
        return bp
