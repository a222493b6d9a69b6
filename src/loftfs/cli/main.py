"""The ``loft`` command: wires one module per subcommand into a typer app.

Also runnable as ``python -m loftfs.cli.main``; a background mount runs ``loftfs.cli.child``.
"""

from __future__ import annotations

import platform
from typing import Annotated

import typer

from loftfs import __version__
from loftfs.cli.common import LoftGroup, state
from loftfs.cli.config import config_cmd
from loftfs.cli.destroy import destroy_cmd
from loftfs.cli.dump import dump_cmd
from loftfs.cli.format import format_cmd
from loftfs.cli.gc import gc_cmd
from loftfs.cli.info import info_cmd
from loftfs.cli.load import load_cmd
from loftfs.cli.materialize import materialize_cmd
from loftfs.cli.mount import mount_cmd
from loftfs.cli.objbench import objbench_cmd
from loftfs.cli.plane import (
    audit_cmd,
    nodegroup_app,
    plane_app,
    serve_cmd,
    tenant_app,
    token_app,
    volume_app,
)
from loftfs.cli.source import import_cmd, source_app
from loftfs.cli.stats import stats_cmd
from loftfs.cli.status import status_cmd
from loftfs.cli.umount import umount_cmd
from loftfs.cli.warmup import warmup_cmd

app = typer.Typer(
    cls=LoftGroup,
    name="loft",
    help="loftfs: a cloud file system for AI training and inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_text() -> str:
    return f"loft {__version__} (Python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks on errors")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    state.verbose = verbose


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(version_text())


app.command("format")(format_cmd)
app.command("mount")(mount_cmd)
app.command("umount")(umount_cmd)
app.command("status")(status_cmd)
app.command("info")(info_cmd)
app.command("config")(config_cmd)
app.command("destroy")(destroy_cmd)
app.command("gc")(gc_cmd)
app.command("dump")(dump_cmd)
app.command("load")(load_cmd)
app.command("objbench")(objbench_cmd)
app.command("stats")(stats_cmd)
app.command("warmup")(warmup_cmd)
app.command("import")(import_cmd)
app.command("materialize")(materialize_cmd)
app.add_typer(source_app, name="source")
app.command("serve")(serve_cmd)
app.add_typer(plane_app, name="plane")
app.add_typer(tenant_app, name="tenant")
app.add_typer(volume_app, name="volume")
app.add_typer(token_app, name="token")
app.add_typer(nodegroup_app, name="nodegroup")
app.command("audit")(audit_cmd)


if __name__ == "__main__":
    app()
