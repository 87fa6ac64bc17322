"""`lvllm gguf info|merge|split`: parse the arguments, print the results.
The work lives in lvllm_cli.gguf_tools (imported lazily: it pulls numpy)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

ORDER = 60

app = typer.Typer(
    name="gguf",
    help="Inspect, split and merge GGUF model files (same files as llama.cpp's llama-gguf-split).",
    no_args_is_help=True,
    add_completion=False,
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="gguf")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _friendly_errors(writing: bool = False) -> Iterator[None]:
    """Known problems become one clear message and exit code 1; Ctrl-C and
    SIGTERM (turned into KeyboardInterrupt while writing, so the staged
    files get removed) exit 130."""
    from lvllm_cli.gguf_tools import GGUFToolError

    previous = None
    if writing:
        def _terminate(signum, frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, _terminate)
    err = _stderr()
    try:
        yield
    except GGUFToolError as e:
        err.print(f"[bold red]error:[/] {e.message}", markup=True, soft_wrap=True)
        if e.fix:
            err.print(f"[bold]fix:[/] {e.fix}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        err.print(f"[bold red]error:[/] {e.strerror or e}{where}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] nothing was written", markup=True)
        raise typer.Exit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress_bar(label: str, quiet: bool) -> Iterator[Any]:
    """Yields a (done, total) callback that drives a bytes/speed/ETA bar on
    stderr. The bar appears on the first call, so a command that fails its
    checks prints only the error."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if quiet:
            return
        if "bar" not in state:
            bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), console=_stderr())
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task(label, total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command("info")
def info_cmd(
    file: Path = typer.Argument(..., metavar="FILE", help="A .gguf file, or any shard of a split model."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (schema in the README)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    this_file: bool = typer.Option(False, "--this-file", help="For a shard: describe this file only, not the whole model."),
) -> None:
    """Architecture, metadata, tensor types (per layer for MoE experts), sizes and split layout."""
    from lvllm_cli.gguf_tools import read_info

    with _friendly_errors():
        data = read_info(file, whole_set=not this_file)
    if as_json:
        _echo_json(data)
    else:
        _print_info(data, tensors)


@app.command("merge")
def merge_cmd(
    first_shard: Path = typer.Argument(..., metavar="FIRST_SHARD", help="The first shard: PREFIX-00001-of-0000N.gguf."),
    out: Optional[Path] = typer.Argument(None, metavar="OUT", help="Output file or directory (default: PREFIX.gguf next to the shards)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Merge a split GGUF into one file, checking every shard first.

    The result is byte for byte what `llama-gguf-split --merge` writes. Nothing
    appears under OUT unless the merge completes."""
    from lvllm_cli.gguf_tools import human_bytes, merge

    with _friendly_errors(writing=True), _progress_bar("merging", quiet or as_json) as progress:
        result = merge(first_shard, out, force=force, progress=progress)
    if as_json:
        _echo_json({"output": str(result.output), "shards": result.shards, "tensors": result.tensors,
                    "bytes": result.bytes_written, "seconds": round(result.seconds, 3)})
        return
    speed = result.bytes_written / result.seconds if result.seconds > 0 else 0
    typer.echo(f"merged {result.shards} shards ({result.tensors} tensors) into {result.output}: "
               f"{human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(speed)}/s)")


def _parse_max_size(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    from lvllm_cli.gguf_tools import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("split")
def split_cmd(
    src: Path = typer.Argument(..., metavar="IN", help="The GGUF file to split."),
    out_prefix: Path = typer.Argument(..., metavar="OUT_PREFIX", help="Shards are named OUT_PREFIX-00001-of-0000N.gguf (a trailing .gguf is dropped)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Most tensor bytes per shard, e.g. 50G (1000^3) or 48GiB."),
    max_tensors: Optional[int] = typer.Option(None, "--max-tensors", help="Most tensors per shard."),
    no_tensor_first_split: bool = typer.Option(False, "--no-tensor-first-split", help="Put only metadata in the first shard."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace shard files that already exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Split a GGUF into shards that llama.cpp loads (same names, keys and layout as llama-gguf-split)."""
    from lvllm_cli.gguf_tools import human_bytes, split

    size = _parse_max_size(max_size)
    with _friendly_errors(writing=True), _progress_bar("splitting", quiet or as_json or dry_run) as progress:
        result = split(src, out_prefix, max_size=size, max_tensors=max_tensors,
                       no_tensor_first_split=no_tensor_first_split, force=force, dry_run=dry_run,
                       progress=progress)
    shards = [{"path": str(p), "tensors": n, "bytes": b} for p, n, b in zip(result.outputs, result.tensors, result.sizes)]
    if as_json:
        _echo_json({"dry_run": dry_run, "shards": shards, "bytes": result.bytes_written,
                    "seconds": round(result.seconds, 3)})
        return
    for s in shards:
        typer.echo(f"{s['path']}  {s['tensors']:>5} tensors  {human_bytes(s['bytes']):>12}")
    if dry_run:
        typer.echo(f"dry run: {len(shards)} shards, {human_bytes(result.bytes_written)}; nothing written")
    else:
        typer.echo(f"wrote {len(shards)} shards, {human_bytes(result.bytes_written)} in {result.seconds:.1f} s")


# ---- human-readable info -------------------------------------------------

_SUMMARY_KEYS = ("context_length", "block_count", "embedding_length", "expert_count", "expert_used_count",
                 "expert_feed_forward_length", "attention.head_count", "attention.head_count_kv")


def _count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _short(entry: dict[str, Any], width: int = 72) -> str:
    if "length" in entry:
        head = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in entry["head"][:4])
        more = ", ..." if entry["length"] > 4 else ""
        return f"[{entry['length']} items] {head}{more}"
    text = repr(entry["value"]) if isinstance(entry["value"], str) else str(entry["value"])
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_info(data: dict[str, Any], list_tensors: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from lvllm_cli.gguf_tools import human_bytes

    con = Console(highlight=False)
    meta = {e["key"]: e for e in data["metadata"]}
    arch = data["architecture"]
    files = f"{len(data['files'])} files, " if len(data["files"]) > 1 else ""
    con.print(f"[bold]{escape(data['path'])}[/]  (GGUF v{data['gguf_version']}, {files}"
              f"{human_bytes(data['file_bytes'])}, alignment {data['alignment']})")
    con.print(f"  architecture  {escape(str(arch))}" + (f"    name  {escape(str(data['name']))}" if data["name"] else ""))
    con.print(f"  tensors       {data['tensor_count']}, {human_bytes(data['tensor_bytes'])}, "
              f"{_count(data['parameters'])} parameters")
    con.print("  types         " + ", ".join(f"{t['type']} x{t['count']} ({human_bytes(t['bytes'])})"
                                              for t in data["tensor_types"]))
    hp = [f"{k}={meta[f'{arch}.{k}']['value']}" for k in _SUMMARY_KEYS if f"{arch}.{k}" in meta]
    if hp:
        con.print("  hyperparams   " + "  ".join(hp))
    if data["experts"]:
        ex = data["experts"]
        con.print(f"  experts       {len(ex['layers'])} MoE layers, {human_bytes(ex['bytes'])} "
                  f"({ex['bytes'] / max(data['tensor_bytes'], 1):.0%} of the tensor bytes)")
        for run in ex["runs"]:
            layers = f"layer {run['first']}" if run["first"] == run["last"] else f"layers {run['first']}-{run['last']}"
            con.print(f"    {layers:<14} " + "  ".join(f"{k} {v}" for k, v in run["tensors"].items()))
    if data["split"]:
        sp = data["split"]
        if len(sp["shards"]) > 1:
            con.print(f"  split         {sp['count']} shards, {sp['tensors_count']} tensors in all")
        else:
            con.print(f"  split         shard {(sp['no'] or 0) + 1} of {sp['count']} "
                      f"({sp['tensors_count']} tensors in the whole model; this file only)")
    table = Table(title=f"metadata ({len(data['metadata'])} keys)", title_justify="left", box=None, pad_edge=False)
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("type")
    table.add_column("value", overflow="fold")
    for e in data["metadata"]:
        table.add_row(escape(e["key"]), e["type"], escape(_short(e)))
    con.print(table)
    if list_tensors:
        t = Table(title=f"tensors ({data['tensor_count']})", title_justify="left", box=None, pad_edge=False)
        for col in ("name", "type", "shape", "bytes", "file"):
            t.add_column(col, justify="right" if col in ("bytes", "file") else "left")
        for x in data["tensors"]:
            t.add_row(escape(x["name"]), x["type"], str(x["shape"]), str(x["bytes"]), str(x["file"]))
        con.print(t)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
