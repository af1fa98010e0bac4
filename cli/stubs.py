"""Console scripts whose capabilities later issues build; each says which one."""

from __future__ import annotations

import sys

import click

__all__ = ["serve"]

_CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


def _stub(name: str, what: str, issue: str) -> click.Command:
    @click.command(name=name, context_settings=_CONTEXT, help=f"{what} (not built yet: {issue}).")
    @click.pass_context
    def command(ctx: click.Context) -> None:
        click.echo(f"{name}: {what} is not built yet; it comes with {issue}.", err=True)
        sys.exit(2)

    return command


serve = _stub("medssl-serve", "the DICOM gateway", "the gateway issue (#7)")
