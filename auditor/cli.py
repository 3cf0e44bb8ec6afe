"""The ``auditor`` command. Exit codes: 0 passed, 1 gate failed, 2 could not run."""
from __future__ import annotations

import os

# Spinning OpenMP threads lose up to 3x on shared machines; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audit a PyTorch image classifier for spurious cues (Clever Hans behaviour).")
err = Console(stderr=True)


@app.command()
def run(config: Path = typer.Argument(..., help="the audit config, e.g. audit.yaml"),
        out: Optional[Path] = typer.Option(None, "--out", help="folder for run folders (default: report.out)"),
        set_: List[str] = typer.Option([], "--set", help="override one config key: KEY=VALUE (repeatable)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Run an audit and write reports/<run-id>/."""
    from auditor.audit import run_audit
    from auditor.config import ConfigError, load_config
    from auditor.data import DataError
    from auditor.outputs import write_run

    try:
        cfg = load_config(config, set_)
        result = run_audit(cfg, quiet=quiet)
        folder = write_run(result, out)
    except (ConfigError, DataError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2)
    except Exception as e:  # a bug or an unreadable input: exit 2 ("could not run"), never 1 ("failed the gate")
        import traceback
        traceback.print_exc()
        err.print(f"[bold red]error:[/] the audit could not run: {type(e).__name__}: {e}", highlight=False)
        raise typer.Exit(2)
    m, g = result.metrics, result.gate
    word = "PASSED" if g["passed"] else "FAILED"
    typer.echo(f"{m['images']} images, accuracy {m['accuracy']:.1%}, {len(result.class_findings)} class findings, "
               f"{len({f.sample for f in result.findings})} flagged images, {len(result.skipped)} skipped")
    for f in result.class_findings[:5]:
        typer.echo(f"  [{f.severity}] {f.cls}: {f.rule} ({f.details.get('region', '')})")
    typer.echo(f"gate {word} (fail_on={g['fail_on']}, worst={g['worst']})")
    typer.echo(f"report: {folder}")
    raise typer.Exit(0 if g["passed"] else 1)


@app.command()
def methods() -> None:
    """List the registered explanation methods."""
    import auditor.methods  # noqa: F401
    from auditor.registry import METHODS
    for e in METHODS:
        typer.echo(f"{e.name:24} {e.description}")


@app.command()
def rules() -> None:
    """List the registered rules."""
    import auditor.rules  # noqa: F401
    from auditor.registry import RULES
    for e in RULES:
        typer.echo(f"{e.name:24} {e.description}")


if __name__ == "__main__":
    app()
