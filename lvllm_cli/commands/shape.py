"""`lvllm shape NAME DIR`: a full-size model directory without weights, to serve with random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lvllm_cli.commands._planning import EXIT_FAILED, fail

ORDER = 45

HELP = """Write a full-size model's config.json and tokenizer (no weights) to serve it with random weights.

No download: plan, serve and benchmark the real shape with vLLM's dummy weights:

    lvllm shape qwen3-30b-a3b ~/shapes/qwen3-30b-a3b
    lvllm serve ~/shapes/qwen3-30b-a3b -- --load-format dummy

Without arguments: the shapes lvllm knows (--json for scripts).
"""


def shape_rows() -> list[dict]:
    """One row per known shape: its name and the figures that size a plan."""
    from lvllm_cli.model_facts import facts_from_config
    from lvllm_cli.tiny_models import SHAPES, _config

    rows = []
    for name, spec in SHAPES.items():
        facts = facts_from_config(_config(spec), source=name)
        rows.append({
            "name": name,
            "architecture": spec["architectures"][0],
            "layers": spec["num_hidden_layers"],
            "experts": facts.num_experts,
            "experts_per_token": facts.experts_per_tok,
            "hidden_size": facts.hidden_size,
            "moe_intermediate_size": facts.moe_intermediate_size,
            "expert_format": facts.quant.label if facts.quant.method != "none" else "bf16",
            "expert_bytes": facts.total_expert_bytes(),
        })  # fmt: skip
    return rows


def shape(
    name: Optional[str] = typer.Argument(None, help="A shape name (see `lvllm shape`)."),
    directory: Optional[Path] = typer.Argument(None, metavar="DIR", help="Where to write it (must not exist, or be empty)."),
    as_json: bool = typer.Option(False, "--json", help="List the shapes as JSON."),
) -> None:
    from lvllm_cli.tiny_models import SHAPES, write_model_shape

    if name is None:
        rows = shape_rows()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title="model shapes (config.json + tokenizer; serve with -- --load-format dummy)", title_justify="left")
        t.add_column("name", no_wrap=True)
        for col in ("architecture", "layers", "experts", "routed experts"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["architecture"], str(r["layers"]), f"{r['experts']} (top {r['experts_per_token']})",
                      f"{r['expert_bytes'] / 2**30:.1f} GiB {r['expert_format']}")
        Console(highlight=False).print(t)
        return
    if as_json:
        raise fail("--json lists the shapes: give no NAME")
    if name not in SHAPES:
        raise fail(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if directory is None:
        raise fail(f"give the directory to write into, e.g. lvllm shape {name} ./{name}")
    directory = directory.expanduser()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise fail(f"{directory} exists and is not an empty directory: pick a new one")
    try:
        written = write_model_shape(name, directory)
    except OSError as e:
        raise fail(f"cannot write {directory}: {e.strerror or e}", EXIT_FAILED) from None
    typer.echo(f"wrote {written} (config.json, tokenizer; no weights)")
    typer.echo(f"serve it with random weights: lvllm serve {written} -- --load-format dummy")


def register(app: typer.Typer) -> None:
    app.command(name="shape", help=HELP)(shape)
