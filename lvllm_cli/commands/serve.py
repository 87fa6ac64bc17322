"""`lvllm serve NAME|DIR [-- vLLM args]`: plan, then run `vllm serve` with the plugin enabled, and supervise it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from lvllm_cli.commands._planning import (
    EXIT_FAILED,
    EXPERTS_FORMAT_HELP,
    PROMPT_RATIO_HELP,
    PlanOptions,
    build_request,
    fail,
    get_machine,
    resolve_target,
    stderr_console,
)

ORDER = 40


def serve(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, metavar="NAME|DIR", help="A profile name, NAME:VARIANT, a profile .yaml file, or a model directory holding config.json (not needed with --plan)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the exact command and environment, then exit."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print argv, env and the plan as JSON."),
    monitor: bool = typer.Option(False, "--monitor", help="Open the live monitor once the server is ready."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", metavar="FILE", help="Serve a plan saved by `lvllm tune --save` instead of planning now."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (anything but loopback without --api-key gets a warning)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LVLLM_API_KEY", help="Require this bearer token (passed to vLLM through its environment, not argv)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Profile variant, e.g. fp8 or awq."),
    machine: Optional[Path] = typer.Option(None, "--machine", metavar="FILE", help="Plan for a machine saved as JSON instead of probing this one."),
    max_model_len: Optional[str] = typer.Option(None, "--max-model-len", help="Context length (32768, 32k, 32K)."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="Sequences decoded together."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", help="Tokens per scheduler step."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="Fraction of each GPU's memory for vLLM (0-1]."),
    gpu_layers: Optional[str] = typer.Option(None, "--gpu-layers", metavar="auto|N", help="MoE layers whose experts stay on the GPU."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline-parallel size."),
    smt: bool = typer.Option(False, "--smt", help="Also use the SMT sibling threads of each core."),
    experts_format: Optional[str] = typer.Option(None, "--experts-format", metavar="auto|quantized|bf16", help=EXPERTS_FORMAT_HELP),
    prompt_ratio: Optional[float] = typer.Option(None, "--prompt-ratio", metavar="R", help=PROMPT_RATIO_HELP),
    force: bool = typer.Option(False, "--force", help="Start even when the plan says it does not fit."),
    ready_timeout: float = typer.Option(1800.0, "--ready-timeout", min=1, help="Seconds to wait for /health before giving up."),
    grace: float = typer.Option(20.0, "--grace", min=0, help="Seconds between the stop signal and SIGKILL."),
) -> None:
    """Serve a MoE model: experts on the CPU, the rest on the GPU, in stock vLLM. Options after `--` go to vLLM and win."""
    from lvllm_cli.serve import ServeError, build_command, find_vllm, is_loopback, load_plan_file, read_overrides, split_options
    from lvllm_cli.compat import supported_range_text, vllm_supported

    err = stderr_console()
    extra = list(ctx.args)
    if target is not None and target.startswith("-"):
        # `serve --plan FILE -- --opt`: click hands the first word after `--` to the NAME|DIR slot.
        extra.insert(0, target)
        target = None
    if as_json and not dry_run:
        raise fail("--json only goes with --dry-run")
    if monitor and not dry_run and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise fail("--monitor needs a terminal (the dashboard takes it over); without one, serve without --monitor "
                   "and watch with `lvllm monitor --once --json`")
    if plan_file is not None:
        if target is not None:
            raise fail("give either NAME|DIR or --plan FILE, not both")
        planning = {"--variant": variant, "--machine": machine, "--max-model-len": max_model_len, "--max-num-seqs": max_num_seqs,
                    "--max-num-batched-tokens": max_num_batched_tokens, "--gpu-memory-utilization": gpu_memory_utilization,
                    "--gpu-layers": gpu_layers, "--tp": tp, "--pp": pp, "--smt": smt or None,
                    "--experts-format": experts_format, "--prompt-ratio": prompt_ratio}  # fmt: skip
        given = [k for k, v in planning.items() if v is not None]
        if given:
            raise fail(f"{', '.join(given)} plan(s) anew and cannot change a saved plan: run `lvllm tune ... --save` again, or pass vLLM options after --")
        try:
            saved = load_plan_file(plan_file)
        except ServeError as e:
            raise fail(str(e)) from None
        model, env, args, fits, problems = saved["model"], saved["env"], saved["vllm_args"], saved["fits"], saved["problems"]
        has_gpu = any(w.get("gpu") is not None for w in saved["workers"])
        plan_dict, needs_generate = saved, False
        if {"tensor-parallel-size", "pipeline-parallel-size"} & {n for n, _ in split_options(extra)}:
            err.print("[yellow]warning:[/] the saved plan's CPU sets were made for its own TP/PP; re-run `lvllm tune` instead of overriding them")
    else:
        if target is None:
            raise fail("give a profile name or a model directory (see `lvllm profiles`), or --plan FILE")
        from lvllm_cli.plan import build_plan

        opts = PlanOptions(variant, machine, max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, gpu_layers, tp, pp, smt,
                           experts_format, prompt_ratio)  # fmt: skip
        request = build_request(opts, extra)
        machine_obj = get_machine(machine)
        target_obj = resolve_target(target, variant)
        if target_obj.generate is not None and not dry_run and machine_obj.gpus:
            # Write the demo model first: the plan must be made from its real config.json.
            if not find_vllm().installed:
                raise fail(f"vLLM is not installed in this Python ({sys.executable}): pip install 'lvllm[vllm]'", EXIT_FAILED)
            _generate_demo(target_obj.generate, Path(target_obj.model), err)
            target_obj = resolve_target(target, variant)
        plan = build_plan(machine_obj, target_obj, request)
        model, env, args, fits, problems = plan.model, plan.env, plan.vllm_args, plan.fits, plan.problems
        has_gpu, plan_dict = plan.has_gpu, plan.to_dict()
        needs_generate = plan.needs_generate

    if not has_gpu:
        raise fail("no NVIDIA GPU found: lvllm serve needs one (`lvllm tune` still shows the plan; `lvllm doctor` checks the driver)", EXIT_FAILED)
    if not fits:
        for p in problems:
            err.print(f"[red bold]problem:[/] {escape(p)}")
        if not force:
            for s in plan_dict.get("suggestions", []):
                err.print(f"[green bold]suggestion:[/] {escape(s)}")
            raise fail("the plan does not fit this machine (`lvllm tune` explains it; --force starts anyway)", EXIT_FAILED)
        err.print("[yellow]--force: starting anyway[/]")

    try:
        cmd = build_command(model, env, args, extra=extra, host=host, port=port, api_key=api_key)
    except ServeError as e:
        raise fail(str(e)) from None
    if not is_loopback(cmd.host) and not api_key and not read_overrides(extra).api_key:
        err.print(
            f"[yellow bold]warning:[/] binding {cmd.host} without --api-key: anyone who can reach this port can use the model"
        )

    vllm = find_vllm()
    if dry_run:
        if not vllm.installed:
            err.print("[yellow]note:[/] vLLM is not installed here; the command below would fail")
        if needs_generate:
            err.print(f"[yellow]note:[/] the demo model is not generated yet; `lvllm serve` writes it to {escape(model)} first")
        if as_json:
            typer.echo(json.dumps({**cmd.to_dict(), "plan": plan_dict}, indent=2))
        else:
            typer.echo("# environment set by lvllm (on top of yours)")
            for k, v in cmd.to_dict()["env"].items():
                typer.echo(f"{k}={v}")
            typer.echo("# command")
            typer.echo(cmd.shell())
        return

    if not vllm.installed:
        raise fail(f"vLLM is not installed in this Python ({sys.executable}): pip install 'lvllm[vllm]'", EXIT_FAILED)
    if vllm.version and not vllm_supported(vllm.version):
        err.print(f"[yellow bold]warning:[/] vLLM {vllm.version} is outside the supported range {supported_range_text()}: the plugin may not load")
    _prepare_metrics_dir(Path(cmd.metrics_dir))

    from lvllm_cli.serve import base_url, curl_example, server_log_path
    from lvllm_cli.supervise import Supervisor

    url = base_url(cmd.host, cmd.port)
    err.print(f"[bold]lvllm serve[/] {escape(model)}")
    err.print(cmd.shell(), markup=False)
    echo_stream = sys.stderr.buffer

    def echo(chunk: bytes) -> None:
        echo_stream.write(chunk)
        echo_stream.flush()

    sup = Supervisor(cmd.argv, {**os.environ, **cmd.env}, f"{url}/health", echo=echo, log_path=server_log_path(cmd.port), grace=grace)

    def on_ready(s: Supervisor) -> None:
        err.print(f"[green bold]ready:[/] {url}/v1  (OpenAI-compatible; model name {escape(repr(cmd.model_name))})")
        from_env = api_key is not None and os.environ.get("LVLLM_API_KEY") == api_key
        err.print("try it:", highlight=False)
        typer.echo(curl_example(cmd, from_env))
        if monitor:
            from lvllm_cli.monitor.app import SERVER_KEPT

            s.echo = None  # the dashboard owns the terminal now; it shows the log file instead
            if _open_monitor(url, s, api_key, Path(cmd.metrics_dir), err) == SERVER_KEPT:
                err.print(f"[bold]lvllm:[/] the server keeps running (pid {s.pid}); its log follows. Ctrl-C stops it.")
                s.echo = echo

    code = sup.run(
        ready_timeout=ready_timeout,
        grace=grace,
        say=lambda m: err.print(f"[bold]lvllm:[/] {escape(m)}", highlight=False, markup=True),
        on_ready=on_ready,
    )
    raise typer.Exit(code)


# ---- the dashboard ------------------------------------------------------------------------------


def _open_monitor(url: str, supervisor, api_key: str | None, metrics_dir: Path, err) -> str:
    """The dashboard on the server `supervisor` runs, until the user quits it.

    Returns the monitor's answer: "server-stopped" (the user had it stopped),
    "server-kept" (leave it running: the supervisor goes on), "server-exited".
    A signal that stops lvllm (Ctrl-C from another terminal, SIGTERM) closes the
    dashboard too. A dashboard that fails never takes the server down.
    """
    from lvllm_cli.monitor.app import SERVER_EXITED, SERVER_KEPT, run_attached

    def connect(app) -> None:
        supervisor.on_stop_request = app.request_exit

    try:
        return run_attached(url, supervisor, api_key=api_key, metrics_dirs=[metrics_dir], on_app=connect)
    except Exception as e:  # noqa: BLE001 - whatever broke the dashboard, the server stays supervised
        err.print(f"[yellow]the monitor failed:[/] {type(e).__name__}: {escape(str(e))}", markup=True)
        return SERVER_KEPT if supervisor.is_running() else SERVER_EXITED
    finally:
        supervisor.on_stop_request = None


# ---- files serve writes ---------------------------------------------------------------------------


def _generate_demo(generate, model_dir: Path, err) -> None:
    """Write the demo model once, into a temporary sibling that is renamed at the end: never half a model."""
    import importlib.util
    import shutil
    import tempfile

    try:
        from lvllm_cli.tiny_models import write_tiny_model
    except ImportError:
        raise fail("this build cannot generate the demo model (lvllm_cli.tiny_models is missing)", EXIT_FAILED) from None
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(
            f"the demo model is written with {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed in this Python ({sys.executable}); they come with vLLM: pip install 'lvllm[vllm]' "
            f"(or pip install {' '.join(missing)})",
            EXIT_FAILED,
        )
    if model_dir.exists():
        raise fail(f"{model_dir} exists but holds no config.json (an interrupted or foreign copy?): remove it and run again", EXIT_FAILED)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    err.print(f"writing the demo model ({generate.arch}) to {model_dir} ...", markup=False)
    scratch = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        try:
            written = Path(write_tiny_model(generate.arch, scratch / model_dir.name))
        except RuntimeError as e:  # torch/transformers present but unusable (tiny_models says which)
            raise fail(f"cannot write the demo model: {e}", EXIT_FAILED) from None
        if not (written / "config.json").is_file():
            raise fail(f"the demo model generator wrote no config.json into {written}", EXIT_FAILED)
        os.replace(written, model_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prepare_metrics_dir(path: Path) -> None:
    """The plugin's per-worker figure files go here: a directory of ours (0700), without the
    files of workers of an earlier server that are gone. A directory we may not use would make
    every worker fail, so it is an error before anything starts."""
    from lvllm_cli.monitor.engine_metrics import prepare_dir, remove_dead_workers

    try:
        prepare_dir(path)
    except OSError as e:
        raise fail(f"CPU-expert figures directory: {e}", EXIT_FAILED) from None
    remove_dead_workers(path)


def register(app: typer.Typer) -> None:
    app.command(
        name="serve",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(serve)
