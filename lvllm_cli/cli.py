"""The `lvllm` command: wires the sub-commands together, nothing else.

Each module in `lvllm_cli.commands` exposes `register(app)` and an integer
`ORDER` (position in `--help`). Modules keep heavy imports inside their
command functions so that `lvllm --help` stays instant.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from lvllm_cli import __version__, commands

app = typer.Typer(
    name="lvllm",
    help="Serve huge Mixture-of-Experts models from one box: experts on the CPU, the rest on the GPU, inside stock vLLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lvllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _command_modules():
    mods = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    return sorted((m for m in mods if hasattr(m, "register")), key=lambda m: getattr(m, "ORDER", 100))


for _module in _command_modules():
    _module.register(app)


def main() -> None:
    app()
