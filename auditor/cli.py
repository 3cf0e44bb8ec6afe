"""The ``auditor`` command. Exit codes: 0 examined and passed, 1 gate failed or the audit was
incomplete, 2 could not run. A crash is never 1: every unexpected error is one line and exit 2
(``--debug`` shows the traceback)."""
from __future__ import annotations

import os

# Spinning OpenMP threads lose up to 3x on shared machines; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit a PyTorch image classifier for spurious cues (Clever Hans behaviour).")

DEBUG = typer.Option(False, "--debug", help="show the traceback of an unexpected error")


def say(line: str) -> None:
    """One line to stdout, with terminal control characters from the data removed."""
    from auditor.outputs.text import terminal
    typer.echo(terminal(line))


def fail(message: str) -> None:
    """One line to stderr; printed as it is (no markup: text from the data may hold brackets)."""
    from auditor.outputs.text import terminal
    typer.echo(f"error: {terminal(message)}", err=True)


@contextmanager
def one_line_errors(debug: bool, on_error=None):
    """Every error becomes one line and exit 2 ("could not run"); never exit 1 ("failed the gate")."""
    from auditor.inputs.config import ConfigError
    from auditor.inputs.data import DataError
    try:
        yield
    except typer.Exit:
        raise
    except (ConfigError, DataError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
    except KeyboardInterrupt:
        message = "interrupted: nothing was written (an audit run again resumes from its cache)"
    except Exception as e:  # a bug or an unreadable input
        if debug:
            import traceback
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        message = f"could not run: {type(e).__name__}" + (f": {first}" if first else "") + \
                  ("" if debug else " (run with --debug for the traceback)")
    else:
        return
    fail(message)
    if on_error:
        try:
            on_error(message)
        except Exception:  # the JUnit path is what failed (the line above says so): nothing more to say
            pass
    raise typer.Exit(2)


@app.command()
def run(config: Path = typer.Argument(..., help="the audit config, e.g. audit.yaml"),
        out: Optional[Path] = typer.Option(None, "--out", help="folder for run folders (default: report.out)"),
        set_: List[str] = typer.Option([], "--set", help="override one config key: KEY=VALUE (repeatable)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
        junit: Optional[Path] = typer.Option(None, "--junit", help="also write JUnit XML here, for CI"),
        debug: bool = DEBUG) -> None:
    """Run an audit and write reports/<run-id>/ (and diff.json when report.baseline is set)."""
    from auditor.outputs import junit as junit_xml

    with one_line_errors(debug, (lambda m: junit_xml.write_error(m, junit)) if junit else None):
        from auditor.audit import run_audit
        from auditor.inputs.config import load_config
        from auditor.inputs.preflight import check_outputs, clean_stale_partials
        from auditor.outputs.write import write_run

        cfg = load_config(config, set_)
        if out is not None:  # the run folder, the cache under it and last_passed all follow --out
            cfg.report.out = out.resolve()
        target = cfg.report.out
        check_outputs(target, junit)           # before any work: an unwritable --out costs nothing
        for note in clean_stale_partials(target):
            say(f"note: {note}")
        result = run_audit(cfg, quiet=quiet)
        from auditor.audit import phase
        with phase("writing the report", quiet):
            folder = write_run(result, out)
        if junit:
            junit_xml.write(result.record, junit)
    rec = result.record
    m, g = rec.metrics, rec.gate
    say(f"{m.images} images, accuracy {m.accuracy:.1%}, {len(rec.class_findings)} class findings, "
        f"{len(rec.flagged())} flagged images, {len(rec.skipped)} skipped")
    for f in rec.class_findings[:5]:
        where = f.details.get("region")
        say(f"  [{f.severity}] {f.cls}: {f.rule}" + (f" ({where})" if where else ""))
    for name, check in {**rec.coverage.methods, **rec.coverage.rules}.items():
        if check.state != "ran":
            say(f"  {name}: {check.words}")
    for w in rec.warnings:
        say(f"warning: {w}")
    from auditor.judge.diff import summary
    from auditor.judge.gate import describe
    for line in [*(summary(rec.diff) if rec.diff else []), *describe(g)]:
        say(line)
    say(f"verdict: {g.verdict}")
    say(f"report: {folder}")
    for name in ("report.html", "report.pdf"):
        if (Path(folder) / name).is_file():
            say(f"  {Path(folder) / name}")
    say("exit code 0: the release gate passed" if g.passed else
        f"exit code 1: the release gate did not pass (verdict {g.verdict}); see page 1 of the report")
    raise typer.Exit(0 if g.passed else 1)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            say(f"auditor {version('auditor')}")
        except PackageNotFoundError:
            say("auditor (version unknown: not installed)")
        raise typer.Exit(0)


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the version and exit")) -> None:
    """Audit a PyTorch image classifier for spurious cues."""


@app.command()
def diff(old: Path = typer.Argument(..., help="the earlier run folder (or its findings.json)"),
         new: Path = typer.Argument(..., help="the later run folder (or its findings.json)"),
         out: Optional[Path] = typer.Option(None, "--out", help="write the comparison as JSON here"),
         debug: bool = DEBUG) -> None:
    """Compare two runs image by image; the exit code is NEW's gate (its fail_on) against OLD."""
    import json

    with one_line_errors(debug):
        from auditor.judge.diff import check_family, classes_of, compare, factory_of, load_run, summary
        from auditor.judge.gate import criteria_of, describe, evaluate

        before, after = load_run(old, str(old)), load_run(new, str(new))
        check_family(before, classes_of(after), factory_of(after), f"{new} against {old}")
        result = compare(before, old, after, after.run.get("seed", 0))
        gate = evaluate(criteria_of(after), after, result)
        if out:
            out.write_text(json.dumps({"run": after.run.get("id"), **result}, indent=1))
        lines = [*summary(result), *describe(gate)]
    for line in lines:
        say(line)
    raise typer.Exit(0 if gate.passed else 1)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a finished run folder, e.g. reports/20261201-120000"),
           formats: str = typer.Option("html,pdf", "--formats", help="which reports to render: html, pdf or both"),
           debug: bool = DEBUG) -> None:
    """Render a finished run's report again from its folder alone (no model, no data needed)."""
    with one_line_errors(debug):
        from auditor.inputs.config import ConfigError
        from auditor.outputs.write import rerender

        wanted = [f.strip() for f in formats.split(",") if f.strip()]
        if not wanted or set(wanted) - {"html", "pdf"}:
            raise ConfigError(f"--formats {formats!r}: give html, pdf or html,pdf")
        written = rerender(run_dir, wanted)
    for path in written:
        say(f"wrote {path}")


@app.command()
def methods() -> None:
    """List the registered explanation methods."""
    import auditor.explain.methods  # noqa: F401
    from auditor.registry import METHODS
    for e in METHODS:
        say(f"{e.name:24} {e.title}: {e.description}")


@app.command()
def rules() -> None:
    """List the registered rules."""
    import auditor.rules  # noqa: F401
    from auditor.registry import RULES
    for e in RULES:
        say(f"{e.name:24} {e.title}: {e.description}" + (f" (needs {', '.join(e.needs)})" if e.needs else ""))


@app.command()
def history(folder: Path = typer.Argument(..., metavar="DIR", help="the folder holding the run folders, e.g. reports"),
            out: Optional[Path] = typer.Option(None, "--out", help="the HTML file to write (default: "
                                               "DIR/history.html); the PDF goes beside it"),
            debug: bool = DEBUG) -> None:
    """Read every run folder in DIR and write history.html and history.pdf: per model family, the
    runs over time, when findings appeared and were resolved, and which runs failed and why."""
    with one_line_errors(debug):
        from auditor.outputs.history import write_history

        written, n, skipped = write_history(folder, out)
    for s in skipped:
        say(f"skipped {s['folder']}: {s['reason']}")
    say(f"{n} runs read")
    for path in written:
        say(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
