"""`lvllm tune [PROFILE|DIR]`: the launch plan for this machine and model, with the reason for every choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lvllm_cli.atomic import write_atomically
from lvllm_cli.commands._planning import EXIT_FAILED, EXPERTS_FORMAT_HELP, PROMPT_RATIO_HELP, PlanOptions, fail, make_plan

ORDER = 30


def tune(
    target: str = typer.Argument(..., metavar="PROFILE|DIR", help="A profile name (see `lvllm profiles`), NAME:VARIANT, a profile .yaml file, or a model directory holding config.json."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Profile variant, e.g. fp8 or awq."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    save: Optional[Path] = typer.Option(None, "--save", metavar="FILE", help="Write the plan as JSON for `lvllm serve --plan FILE`."),
    measure: bool = typer.Option(False, "--measure", help="Time the CPU-experts engine at the model's shapes: over a few thread counts (keeps the fastest) and, for quantized experts, in their format and in bf16 (for --experts-format auto)."),
    measure_seconds: float = typer.Option(2.0, "--measure-seconds", min=0.1, help="Seconds per thread count (and per experts format) with --measure."),
    machine: Optional[Path] = typer.Option(None, "--machine", metavar="FILE", help="Plan for a machine saved as JSON instead of probing this one."),
    max_model_len: Optional[str] = typer.Option(None, "--max-model-len", help="Context length to plan for (32768, 32k, 32K); never lowered when given."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="Sequences decoded together; never lowered when given."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", help="Tokens per scheduler step."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="Fraction of each GPU's memory for vLLM (0-1]."),
    gpu_layers: Optional[str] = typer.Option(None, "--gpu-layers", metavar="auto|N", help="MoE layers whose experts stay on the GPU: auto (as many as fit) or a count."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size (default: chosen from the GPU topology)."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline-parallel size (default: chosen from the GPU topology)."),
    smt: bool = typer.Option(False, "--smt", help="Also use the SMT sibling threads of each core."),
    experts_format: Optional[str] = typer.Option(None, "--experts-format", metavar="auto|quantized|bf16", help=EXPERTS_FORMAT_HELP),
    prompt_ratio: Optional[float] = typer.Option(None, "--prompt-ratio", metavar="R", help=PROMPT_RATIO_HELP),
) -> None:
    """Plan how to serve a MoE model on this machine: TP/PP, CPU sets, GPU layers, memory fit."""
    from rich.console import Console

    opts = PlanOptions(variant, machine, max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, gpu_layers, tp, pp, smt,
                       experts_format, prompt_ratio)  # fmt: skip
    target_obj, machine_obj, request, plan = make_plan(target, opts)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if measure and machine is not None:
        err.print(f"[yellow]--measure skipped:[/] it times this machine's CPUs, but the plan is for the machine in {machine}")
    elif measure:
        plan = _measure(plan, target_obj, machine_obj, request, measure_seconds, err)
    data = plan.to_dict()
    if save is not None:
        try:
            write_atomically(save, json.dumps(data, indent=2) + "\n")
        except OSError as e:
            raise fail(f"cannot write {save}: {e}") from None
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        from lvllm_cli.plan_view import render_plan

        render_plan(plan, Console(highlight=False, soft_wrap=False))
        if save is not None:
            Console(highlight=False).print(f"plan saved to {save}; start it with: lvllm serve --plan {save}")
    if not plan.fits:
        raise typer.Exit(EXIT_FAILED)


def _measure(plan, target, machine, request, seconds, err):
    from rich.markup import escape

    from lvllm_cli import measure as m

    bench, format_bench = m.load_bench(), m.load_format_bench()
    if bench is None and format_bench is None:
        err.print("[yellow]--measure skipped:[/] this build has no CPU-experts engine benchmark (lvllm_cli.moe.bench); the plan keeps its rules")
        return plan
    err.print(f"measuring the CPU-experts engine at the model's shapes ({seconds:g} s per thread count and experts format)...")
    try:
        return m.measure_plan(machine, target, request, plan, threads_bench=bench, format_bench=format_bench,
                              seconds=seconds, report=lambda s: err.print("  " + s, markup=False))
    except Exception as e:  # the engine's own errors: report, keep the unmeasured plan
        err.print(f"[yellow]--measure failed:[/] {type(e).__name__}: {escape(str(e))}; the plan keeps its rules", markup=True)
        return plan


def register(app: typer.Typer) -> None:
    app.command(name="tune")(tune)
