"""`lvllm build [--native] [--json]`: rebuild the CPU-experts engine in place for this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

ORDER = 70

HELP = """Rebuild the CPU-experts engine (lk_moe) in place, from the C++ sources lvllm ships.

--native compiles it for this CPU only (-march=native); without it the module is portable
(it picks AVX2 / AVX-512 / AMX kernels at run time). Needs cmake, a C++ compiler and
nanobind (pip install 'lvllm[build]'). The installed module is replaced only once the new
one has loaded; a failed build leaves it as it was.
"""


def build(
    native: bool = typer.Option(False, "--native", help="Compile for this CPU only (-march=native)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no progress display)."),
    into: Optional[Path] = typer.Option(None, "--into", metavar="DIR",
                                        help="Rebuild the lvllm_cli package at DIR (a copy) instead of the installed one."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs (default: the CPUs we may use)."),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from lvllm_cli.build import BuildError, build as run_build, parse_progress

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    live = err.is_terminal and not as_json
    progress = _Display(err, live, quiet=as_json)
    try:
        with progress:
            result = run_build(into, native=native, jobs=jobs, on_phase=progress.phase,
                               on_line=lambda line: progress.line(line, parse_progress(line)))
    except BuildError as e:
        if e.log_tail and not as_json:
            err.print("[bold]last lines of the build:[/]")
            for line in e.log_tail:
                err.print("  | " + line, markup=False)
        err.print(f"[red bold]error:[/] {escape(str(e))}")
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": str(e), "log_tail": e.log_tail}, indent=2))
        raise typer.Exit(e.code) from None
    if as_json:
        typer.echo(json.dumps({"ok": True, **result.to_dict()}, indent=2))
        return
    err.print(f"[green bold]built[/] {escape(str(result.module))} in {result.seconds:.0f} s "
              f"({'replaced the old module' if result.replaced else 'new'})")
    typer.echo(f"flavour      {result.flavour}")
    typer.echo(f"best ISA     {result.best_isa}")
    typer.echo(f"bf16 kernel  {result.kernels['bfloat16']}")
    typer.echo(f"fp16 kernel  {result.kernels['float16']}")
    if result.native:
        err.print("note: a --native module runs only on CPUs with this one's instruction set; "
                  "rebuild without --native before copying the environment elsewhere", markup=False)


class _Display:
    """Progress of the build: a bar with the file being compiled on a terminal, plain lines elsewhere."""

    def __init__(self, console, live: bool, quiet: bool):
        self.console = console
        self.live = live
        self.quiet = quiet
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def phase(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=name)
        elif not self.quiet:
            self.console.print(f"lvllm build: {name}", markup=False)

    def line(self, text: str, step) -> None:
        if step is None:
            if not self.quiet and ("warning" in text or "error" in text):
                self.console.print(text, markup=False)  # compiler diagnostics stay visible
            return
        if self._progress is not None:
            if step.total is not None:
                self._progress.update(self._task, description=step.what, completed=step.done, total=step.total)
            else:
                self._progress.update(self._task, description=step.what, completed=step.percent, total=100)
        elif not self.quiet:
            where = f"{step.done}/{step.total}" if step.total is not None else f"{step.percent}%"
            self.console.print(f"lvllm build: [{where}] {step.what}", markup=False)


def register(app: typer.Typer) -> None:
    app.command(name="build", help=HELP)(build)
