"""Turn medssl's typed errors into a clean message on stderr and a non-zero exit."""

from __future__ import annotations

from typing import Any

import click

from medssl.errors import MedsslError

__all__ = ["MedsslCommand", "MedsslGroup"]


class _UserErrors:
    """Mixin: a :class:`MedsslError` becomes ``Error: <message>`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except MedsslError as exc:
            raise click.ClickException(str(exc)) from None


class MedsslGroup(_UserErrors, click.Group):
    """A click group whose commands report MedsslError without a traceback."""


class MedsslCommand(_UserErrors, click.Command):
    """A click command that reports MedsslError without a traceback."""
