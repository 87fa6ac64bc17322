"""`lvllm doctor`: can this machine run hybrid CPU+GPU MoE inference well, and what to fix."""

from __future__ import annotations

from typing import Optional

import typer

ORDER = 10

JSON_SCHEMA_VERSION = 1


def register(app: typer.Typer) -> None:
    app.command("doctor", help="Check this machine for CPU+GPU MoE serving: findings with evidence and fixes.")(doctor)


def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the probe and the findings as JSON."),
    sysroot: Optional[str] = typer.Option(
        None, "--sysroot", metavar="DIR|FILE.tar.gz",
        help="Judge a captured machine (a directory or a --capture archive) instead of this one. "
             "Default: $LVLLM_SYSROOT, else /."),
    model: Optional[str] = typer.Option(None, "--model", metavar="DIR",
                                        help="A Hugging Face checkpoint directory: check that its experts fit in RAM."),
    capture: Optional[str] = typer.Option(None, "--capture", metavar="FILE.tar.gz",
                                          help="Write the kernel files the probe reads to FILE.tar.gz for a bug report."),
) -> None:
    import os
    import shutil

    from lvllm_cli.capture import open_sysroot, write_capture
    from lvllm_cli.probe import SYSROOT_ENV, probe

    root_arg = sysroot or os.environ.get(SYSROOT_ENV) or None
    cleanup = None
    try:
        root = "/"
        if root_arg:
            try:
                root, cleanup = open_sysroot(root_arg)
            except ValueError as e:
                _die(f"--sysroot: {e}", "give a directory or a file written by `lvllm doctor --capture`")

        if capture:
            _write_capture(capture, root, json_out, write_capture)
            return

        footprint = None
        if model:
            from lvllm_cli.model_footprint import footprint as model_footprint

            try:
                footprint = model_footprint(model)
            except ValueError as e:
                _die(f"--model: {e}", "point --model at a checkpoint directory holding config.json and *.safetensors")

        machine = probe(root)
        if cleanup:  # an extracted archive: name the archive, not the temp dir
            machine.sysroot = os.path.abspath(root_arg)
        _report(machine, root, footprint, json_out)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _write_capture(capture: str, root: str, json_out: bool, write_capture) -> None:
    import json
    import os

    directory = os.path.dirname(os.path.abspath(capture))
    if not os.path.isdir(directory):
        _die(f"--capture: directory {directory} does not exist", "create it or write the capture elsewhere")
    if os.path.isdir(capture):
        _die(f"--capture: {capture} is a directory", "give a file name such as lvllm-capture.tar.gz")
    try:
        count = write_capture(capture, root)
    except OSError as e:
        _die(f"--capture: cannot write {capture}: {e.strerror or e}", "choose a writable location")
    if json_out:
        typer.echo(json.dumps({"capture": os.path.abspath(capture), "files": count}))
    else:
        typer.echo(f"wrote {capture}: {count} kernel files (hardware facts only). "
                   f"Attach it to the bug report; replay with: lvllm doctor --sysroot {capture}")


def _report(machine, root: str, footprint, json_out: bool) -> None:
    from lvllm_cli.doctor import kernel_variant, run_checks, worst

    env = None
    if root == "/":
        from lvllm_cli.pystack import gather_stack

        env = gather_stack()
    findings = run_checks(machine, env,
                          model_bytes=footprint.expert_bytes if footprint else None,
                          model_note=footprint.source if footprint else "")
    verdict = worst(findings)
    if json_out:
        _print_json(machine, env, findings, verdict, kernel_variant(machine, env), footprint)
    else:
        _print_table(machine, findings, verdict, kernel_variant(machine, env))
    raise typer.Exit(1 if verdict == "fail" else 0)


def _print_json(machine, env, findings, verdict, variant, footprint) -> None:
    import json
    import sys
    from dataclasses import asdict

    d = machine.to_dict()
    doc = {
        "schema": JSON_SCHEMA_VERSION,
        "verdict": verdict,
        "sysroot": machine.sysroot,
        "kernel_variant": variant,
        "cpu": d["cpu"],
        "numa": {"nodes": d["numa"]},
        "memory": d["memory"],
        "gpus": d["gpus"],
        "nvml_error": machine.nvml_error,
        "python": asdict(env) if env is not None else None,
        "model": asdict(footprint) if footprint else None,
        "read_problems": [{"path": p, "problem": why} for p, why in machine.read_problems],
        "findings": [f.to_dict() for f in findings],
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def _print_table(machine, findings, verdict, variant) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # No emoji codes (":ab:" in a PCI bus id is one) and no guessing highlights: evidence is verbatim.
    console = Console(emoji=False, highlight=False)
    cpu = machine.cpu
    where = "" if machine.sysroot == "/" else f" (captured: {machine.sysroot})"
    console.print(
        f"[bold]{escape(cpu.model or 'unknown CPU')}[/bold]{escape(where)}: {cpu.sockets} socket(s), {cpu.physical_cores} cores, "
        f"{len(machine.numa)} NUMA node(s), {machine.memory.total_bytes / (1 << 30):.0f} GiB RAM, "
        f"{len(machine.gpus)} GPU(s); expert kernels: [bold]{variant}[/bold]"
    )
    table = Table(show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("evidence", overflow="fold")
    table.add_column("fix", overflow="fold")
    for f in findings:
        style = _STYLE.get(f.status, "")
        table.add_row(Text(f.check), Text(f.status, style=style), Text(f.evidence), Text(f.fix))
    console.print(table)
    counts = {s: sum(1 for f in findings if f.status == s) for s in ("ok", "warn", "fail")}
    style = _STYLE[verdict]
    console.print(f"[{style}]{verdict}[/{style}]: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")


def _die(message: str, fix: str) -> None:
    typer.echo(f"error: {message}\n  fix: {fix}", err=True)
    raise typer.Exit(2)
