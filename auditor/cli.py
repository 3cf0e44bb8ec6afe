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
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
        junit: Optional[Path] = typer.Option(None, "--junit", help="also write JUnit XML here, for CI")) -> None:
    """Run an audit and write reports/<run-id>/ (and diff.json when report.baseline is set)."""
    import json

    from auditor.outputs import junit as junit_xml
    from auditor.audit import run_audit
    from auditor.inputs.config import ConfigError, load_config
    from auditor.inputs.data import DataError
    from auditor.outputs.write import write_run

    try:
        cfg = load_config(config, set_)
        result = run_audit(cfg, quiet=quiet)
        folder = write_run(result, out)
    except (ConfigError, DataError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        if junit:
            junit_xml.write_error(str(e), junit)
        raise typer.Exit(2)
    except Exception as e:  # a bug or an unreadable input: exit 2 ("could not run"), never 1 ("failed the gate")
        import traceback
        traceback.print_exc()
        err.print(f"[bold red]error:[/] the audit could not run: {type(e).__name__}: {e}", highlight=False)
        if junit:
            junit_xml.write_error(f"the audit could not run: {type(e).__name__}: {e}", junit)
        raise typer.Exit(2)
    if junit:
        junit_xml.write(json.loads((folder / "findings.json").read_text()), junit)
    m, g = result.metrics, result.gate
    typer.echo(f"{m['images']} images, accuracy {m['accuracy']:.1%}, {len(result.class_findings)} class findings, "
               f"{len({f.sample for f in result.findings})} flagged images, {len(result.skipped)} skipped")
    for f in result.class_findings[:5]:
        where = f.details.get("region")
        typer.echo(f"  [{f.severity}] {f.cls}: {f.rule}" + (f" ({where})" if where else ""))
    for w in result.warnings:
        typer.echo(f"warning: {w}")
    from auditor.judge.diff import summary
    from auditor.judge.gate import describe
    for line in [*(summary(result.diff) if result.diff else []), *describe(g)]:
        typer.echo(line)
    typer.echo(f"report: {folder}")
    raise typer.Exit(0 if g["passed"] else 1)


@app.command()
def diff(old: Path = typer.Argument(..., help="the earlier run folder (or its findings.json)"),
         new: Path = typer.Argument(..., help="the later run folder (or its findings.json)"),
         out: Optional[Path] = typer.Option(None, "--out", help="write the comparison as JSON here")) -> None:
    """Compare two runs image by image; the exit code is NEW's gate (its fail_on) against OLD."""
    import json

    from auditor.inputs.config import ConfigError
    from auditor.judge.diff import check_family, classes_of, compare, factory_of, load_run, summary
    from auditor.judge.gate import criteria_of, describe, evaluate

    try:
        before, after = load_run(old, str(old)), load_run(new, str(new))
        check_family(before, classes_of(after), factory_of(after), f"{new} against {old}")
    except ConfigError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2)
    result = compare(before, old, after, after["run"].get("seed", 0))
    gate = evaluate(criteria_of(after), after, result)
    if out:
        out.write_text(json.dumps({"run": after["run"].get("id"), **result}, indent=1))
    for line in [*summary(result), *describe(gate)]:
        typer.echo(line)
    raise typer.Exit(0 if gate["passed"] else 1)


@app.command()
def methods() -> None:
    """List the registered explanation methods."""
    import auditor.explain.methods  # noqa: F401
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
