"""Glue shared by `lvllm tune` and `lvllm serve`: options -> Request, target + machine -> Plan, clean errors.

(No `register` here: cli.py skips this module.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

# Exit codes: 2 = the input is wrong (unknown profile, bad file, bad option),
# 1 = the input is fine but the plan or the server failed.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

# Help of the planning options that tune and serve share.
EXPERTS_FORMAT_HELP = ("Quantized checkpoints: keep the CPU experts quantized, or widen them to bf16 at load (more RAM, "
                       "faster prefill, slower decode); auto (default) decides from RAM and speed. bf16 is refused when it "
                       "does not fit. Default: LVLLM_EXPERTS_BF16 when set, else auto.")
PROMPT_RATIO_HELP = ("Prompt tokens prefilled per generated token in your workload (default 4, chat-like; coding agents and "
                     "RAG: 20-50); weighs prefill against decode for --experts-format auto.")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    from rich.console import Console
    from rich.markup import escape

    # escape: messages quote user input and shell text such as `pip install 'lvllm[vllm]'`
    Console(stderr=True, highlight=False).print(f"[red bold]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


@dataclass
class PlanOptions:
    variant: str | None = None
    machine_file: Path | None = None
    max_model_len: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    gpu_layers: str | None = None
    tp: int | None = None
    pp: int | None = None
    smt: bool = False
    experts_format: str | None = None  # auto | quantized | bf16; None: LVLLM_EXPERTS_BF16 if set, else auto
    prompt_ratio: float | None = None


def parse_gpu_layers(text: str | None) -> tuple[int | None, bool]:
    """'auto' -> (None, True); '12' -> (12, False); None -> (None, False)."""
    if text is None:
        return None, False
    if text.strip().lower() == "auto":
        return None, True
    if not text.strip().isdigit():
        raise fail(f"--gpu-layers {text!r}: expected 'auto' or a number of MoE layers")
    return int(text), False


def build_request(opts: PlanOptions, extra: list[str] | None = None):
    """The planner's Request from lvllm's options and the vLLM options after `--` (those win)."""
    from lvllm_cli.plan import Request
    from lvllm_cli.serve import ServeError, human_int, read_overrides

    try:
        ov = read_overrides(extra or [])
        max_len = human_int(opts.max_model_len, "--max-model-len") if opts.max_model_len else None
    except ServeError as e:
        raise fail(str(e)) from None
    for name, value in (("--max-num-seqs", opts.max_num_seqs), ("--max-num-batched-tokens", opts.max_num_batched_tokens),
                        ("--tp", opts.tp), ("--pp", opts.pp), ("--max-model-len", max_len)):  # fmt: skip
        if value is not None and value <= 0:
            raise fail(f"{name} must be a positive number, got {value}")
    u = opts.gpu_memory_utilization
    if u is not None and not 0 < u <= 1:
        raise fail(f"--gpu-memory-utilization {u}: must be in (0, 1]")
    layers, auto = parse_gpu_layers(opts.gpu_layers)
    fmt, fmt_by = experts_format_request(opts.experts_format, os.environ)
    if opts.prompt_ratio is not None and opts.prompt_ratio < 0:
        raise fail(f"--prompt-ratio {opts.prompt_ratio}: must be >= 0 (prompt tokens per generated token)")
    return Request(
        max_model_len=ov.max_model_len or max_len,
        max_num_seqs=ov.max_num_seqs or opts.max_num_seqs,
        max_num_batched_tokens=ov.max_num_batched_tokens or opts.max_num_batched_tokens,
        gpu_memory_utilization=ov.gpu_memory_utilization or u,
        gpu_layers=layers,
        gpu_layers_auto=auto,
        tp=ov.tp or opts.tp,
        pp=ov.pp or opts.pp,
        smt=opts.smt,
        kv_cache_dtype_bytes=ov.kv_cache_dtype_bytes,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        experts_format=fmt,
        experts_format_by=fmt_by,
        prompt_ratio=opts.prompt_ratio,
    )


def experts_format_request(option: str | None, environ) -> tuple[str, str]:
    """(auto|quantized|bf16, who asked) from --experts-format, else from LVLLM_EXPERTS_BF16 in the environment
    (the plan sets that variable for vLLM, so a value the user exported is taken as their request)."""
    from lvllm_cli.experts_format import CHOICES

    if option is not None:
        value = option.strip().lower()
        if value not in CHOICES:
            raise fail(f"--experts-format {option!r}: expected one of {', '.join(CHOICES)}")
        return value, "--experts-format"
    raw = environ.get("LVLLM_EXPERTS_BF16", "").strip()
    if raw == "":
        return "auto", "--experts-format"
    if raw not in ("0", "1"):
        raise fail(f"LVLLM_EXPERTS_BF16={raw!r} in the environment: use 1 (widen to bf16 at load) or 0, "
                   "or unset it and pass --experts-format auto|quantized|bf16")
    return ("bf16" if raw == "1" else "quantized"), f"LVLLM_EXPERTS_BF16={raw} in the environment"


def resolve_target(arg: str, variant: str | None):
    from lvllm_cli.profiles import ProfileError, resolve

    try:
        return resolve(arg, variant)
    except ProfileError as e:
        raise fail(str(e)) from None


def get_machine(machine_file: Path | None):
    from lvllm_cli.machine_io import MachineError, load_machine_file, probe_this_machine

    try:
        return load_machine_file(machine_file) if machine_file else probe_this_machine()
    except MachineError as e:
        raise fail(str(e), EXIT_FAILED if machine_file is None else EXIT_BAD_INPUT) from None


def make_plan(arg: str, opts: PlanOptions, extra: list[str] | None = None):
    from lvllm_cli.plan import build_plan

    target = resolve_target(arg, opts.variant)
    request = build_request(opts, extra)
    machine = get_machine(opts.machine_file)
    return target, machine, request, build_plan(machine, target, request)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
