"""`lvllm profiles`: the known profiles, their models and variants."""

from __future__ import annotations

import json

import typer

from lvllm_cli.commands._planning import fail

ORDER = 25


def profiles(as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON.")) -> None:
    """List the model profiles `lvllm tune` and `lvllm serve` accept (built-in and <lvllm home>/profiles)."""
    from lvllm_cli.paths import user_profiles_dir
    from lvllm_cli.profiles import ProfileError, all_profiles

    try:
        profs = all_profiles()
    except ProfileError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "description": p.description,
                        "model": p.model,
                        "generated": p.generate is not None,
                        "variants": {v.name: {"model": v.model or p.model, "description": v.description} for v in p.variants.values()},
                        "file": p.path,
                    }
                    for p in profs.values()
                ],
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"profiles (add your own in {user_profiles_dir()})", title_justify="left")
    t.add_column("name", style="bold cyan", no_wrap=True)
    t.add_column("model")
    t.add_column("variants")
    t.add_column("description")
    for p in profs.values():
        model = p.model or f"(generated locally: {p.generate.arch})"
        variants = "\n".join(f"{v.name}: {v.model or p.model}" for v in p.variants.values()) or "-"
        t.add_row(p.name, model, variants, p.description)
    Console(highlight=False).print(t)


def register(app: typer.Typer) -> None:
    app.command(name="profiles")(profiles)
