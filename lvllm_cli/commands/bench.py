"""`lvllm bench moe`: the CPU expert engine at real model shapes."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

ORDER = 60

bench_app = typer.Typer(help="Benchmarks of the CPU expert engine.", no_args_is_help=True)


@bench_app.command("moe")
def moe(
    model: List[str] = typer.Option(None, "--model", "-m", help="Model shape (repeatable): qwen3-30b-a3b, qwen3-next-80b. Default: both."),
    decode: List[int] = typer.Option([1], "--decode", help="Decode token counts."),
    prefill: List[int] = typer.Option([128, 1024], "--prefill", help="Prefill token counts."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Worker threads (default: one per physical core, or LK_THREADS)."),
    virtual_nodes: Optional[int] = typer.Option(None, "--virtual-nodes", help="Split the workers into N groups as if they were NUMA nodes."),
    passes: int = typer.Option(3, "--passes", help="Timed passes over all layers."),
    dtype: List[str] = typer.Option(["bfloat16"], "--dtype", help="Expert weights (repeatable): bfloat16, int4 (group 128, int8 activations where the CPU has VNNI), "
                                    "int4-bf16act (the same on bf16 activations), fp8 (128-blocks)."),
    group: Optional[int] = typer.Option(None, "--group", help="Scale group of the quantized dtypes (default 128; e.g. 32, as in "
                                        "many AWQ/GPTQ checkpoints)."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Skip the PyTorch reference."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Time decode and prefill per layer against the machine's read bandwidth and a PyTorch reference."""
    from rich.console import Console
    from rich.table import Table

    from lvllm_cli.moe.bench import MODEL_SHAPES, bench_moe, rows_as_dicts
    from lvllm_cli.moe.native import EngineUnavailable

    err = Console(stderr=True)
    models = model or list(MODEL_SHAPES)
    try:
        import torch  # noqa: F401
    except ImportError:
        err.print("[red]lvllm bench moe needs PyTorch[/red] (pip install torch) for its tensors and reference.")
        raise typer.Exit(2)
    try:
        with err.status("starting") as status:
            bandwidth, rows = bench_moe(
                models, {"decode": decode, "prefill": prefill}, threads=threads, virtual_nodes=virtual_nodes,
                passes=passes, with_torch=not no_torch, dtypes=tuple(dtype), group=group, progress=lambda s: (status.update(s), err.log(s)),
            )
    except (ValueError, MemoryError, EngineUnavailable) as exc:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps({"bandwidth_gbps": round(bandwidth, 1), "rows": rows_as_dicts(rows)}, indent=2))
        return
    t = Table(title=f"lk_moe, {rows[0].threads if rows else '?'} threads, read bandwidth {bandwidth:.1f} GB/s")
    for col in ("model", "dtype", "mode", "tokens", "layers", "kernel", "us/layer", "GB/s", "% of bw", "TFLOP/s", "torch us", "x torch"):
        t.add_column(col, justify="right" if col not in ("model", "dtype", "mode", "kernel") else "left")
    for r in rows:
        t.add_row(r.model, r.dtype, r.mode, str(r.tokens), str(r.layers), r.kernel, f"{r.us_per_layer:.0f}", f"{r.gbps:.1f}",
                  f"{r.pct_of_bandwidth:.0f}%", f"{r.tflops:.2f}",
                  "-" if r.torch_us_per_layer is None else f"{r.torch_us_per_layer:.0f}",
                  "-" if r.torch_ratio is None else f"{r.torch_ratio:.2f}")
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
