"""``edgefleet``: the command line of the control plane.

Client commands (``apply``, ``diff``, ``delete``, ``get``, ``describe``, ``events``,
``rollout``, ``models``, ``login``, ``tokens``, ``nodes``) talk to the REST API; process
commands (``server``, ``worker``, ``beat``, ``db``, ``demo``) run a part of the control
plane."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

# typer prints the same for `--show-completion SHELL`; a command reads as kubectl's does.
from typer._completion_shared import get_completion_script

from controller import __version__
from controller.cli import access
from controller.cli.apply import apply_manifests
from controller.cli.delete import delete
from controller.cli.describe import describe_app
from controller.cli.diff import diff
from controller.cli.events import events
from controller.cli.get import get_app
from controller.cli.models import models_app
from controller.cli.output import console, err_console
from controller.cli.rollout import rollout_app

app = typer.Typer(
    name="edgefleet",
    help="Roll ML models out to fleets of K3s edge nodes, wave by wave, behind health gates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema migrations (Alembic).")
# The order of registration is the order of ``edgefleet --help``.
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.command("apply")(apply_manifests)
app.command("diff")(diff)
app.command("delete")(delete)
app.add_typer(get_app, name="get")
app.add_typer(describe_app, name="describe")
app.command("events")(events)
app.add_typer(rollout_app, name="rollout")
app.command("login")(access.login)
app.add_typer(access.tokens_app, name="tokens")
app.add_typer(access.nodes_app, name="nodes")
app.add_typer(access.clusters_app, name="clusters")


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"
    powershell = "powershell"


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="The shell to complete in.")]) -> None:
    """Print the shell completion script.

    bash: `source <(edgefleet completion bash)` (or into ~/.bashrc); zsh: `edgefleet
    completion zsh > "${fpath[1]}/_edgefleet"`; fish: `edgefleet completion fish >
    ~/.config/fish/completions/edgefleet.fish`. Commands, options, and their choices
    (kinds, output formats) complete."""
    script = get_completion_script(
        prog_name="edgefleet", complete_var="_EDGEFLEET_COMPLETE", shell=shell.value
    )
    console.print(script, markup=False, highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the edgefleet version."""
    console.print(__version__)


# ---------------------------------------------------------------- processes


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database schema up to REVISION (default: head)."""
    # Lazy, for start-up time: Alembic and SQLAlchemy take ~0.3 s that client commands skip.
    from controller.db import migrate
    from controller.settings import get_settings

    settings = get_settings()
    migrate.upgrade(settings, revision)
    console.print(f"database at revision {migrate.current_revision(settings)}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Migrate the database schema down to REVISION ('base' removes everything)."""
    # Lazy, for start-up time: Alembic and SQLAlchemy take ~0.3 s that client commands skip.
    from controller.db import migrate
    from controller.settings import get_settings

    settings = get_settings()
    migrate.downgrade(settings, revision)
    console.print(f"database at revision {migrate.current_revision(settings)}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's schema revision and the code's head revision."""
    # Lazy, for start-up time: Alembic and SQLAlchemy take ~0.3 s that client commands skip.
    from controller.db import migrate
    from controller.settings import get_settings

    console.print(
        f"current {migrate.current_revision(get_settings())} head {migrate.head_revision()}"
    )


API_METRICS_DIR = "edgefleet-api-metrics"


def _multiprocess_metrics(enable: Callable[[], object]) -> None:
    """Turn on prometheus_client's multiprocess mode with ``enable``, or exit 2 when
    another process of the same kind holds its directory (kit/multiprocess.py)."""
    from controller.kit.multiprocess import MetricsDirInUse

    try:
        enable()
    except MetricsDirInUse as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Bind address (EDGEFLEET_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (EDGEFLEET_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """Run the REST API (uvicorn)."""
    # Lazy, for start-up time: uvicorn and pydantic-settings add 50-90 ms to every command.
    import uvicorn

    from controller.kit.multiprocess import enable
    from controller.settings import get_settings

    if workers > 1:
        # Each scrape is answered by one of the processes: /metrics must sum them all.
        # Before anything imports prometheus_client (the processes inherit the variable).
        _multiprocess_metrics(lambda: enable(API_METRICS_DIR))

    settings = get_settings()
    if settings.api_keepalive_timeout_s <= settings.agent_heartbeat_interval_s:
        err_console.print(
            f"[yellow]warning:[/yellow] EDGEFLEET_API_KEEPALIVE_TIMEOUT_S "
            f"({settings.api_keepalive_timeout_s} s) is not above the agents' heartbeat "
            f"interval ({settings.agent_heartbeat_interval_s:g} s): every heartbeat opens "
            "a new connection",
            highlight=False,
        )
    uvicorn.run(
        "controller.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        proxy_headers=True,
        # Agents keep their connection between heartbeats (uvicorn's default is 5 s).
        timeout_keep_alive=settings.api_keepalive_timeout_s,
        log_level="info",
    )


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    loglevel: Annotated[str, typer.Option()] = "INFO",
    max_tasks_per_child: Annotated[
        int | None,
        typer.Option(min=1, help="Replace a pool process after this many tasks (default: never)."),
    ] = None,
) -> None:
    """Run a Celery worker (validation, benchmarks, rollout reconciles)."""
    # Lazy, for start-up time: Celery and the task modules take ~0.8 s.
    from controller.settings import get_settings

    settings = get_settings()
    if settings.worker_metrics_port:
        # Before anything imports prometheus_client: it picks its value class at import.
        from controller.tasks.worker_metrics import enable_multiprocess

        _multiprocess_metrics(enable_multiprocess)
    from controller.tasks.celery_app import celery_app

    if settings.worker_metrics_port:
        from controller.api.worker_metrics import serve_from_worker

        serve_from_worker(settings)
    celery_app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            f"--queues={settings.celery_queue}",
            "--without-gossip",
            "--without-mingle",
            *([f"--max-tasks-per-child={max_tasks_per_child}"] if max_tasks_per_child else []),
        ]
    )


@app.command()
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat: the schedule of periodic reconciles and sweeps (run exactly one)."""
    # Lazy, for start-up time: Celery and the task modules take ~0.8 s.
    from controller.tasks.celery_app import celery_app

    schedule = Path(tempfile.gettempdir()) / "edgefleet-beat-schedule"
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port of the demo controller.")] = 8080,
    serve: Annotated[
        bool, typer.Option(help="Serve the dashboard; --no-serve plays the scenario and exits.")
    ] = True,
    bake: Annotated[str, typer.Option(help="Bake time of each rollout step.")] = "3s",
    verbose: Annotated[
        bool, typer.Option(help="Logs to stderr; without it they go to .edgefleet/demo.log.")
    ] = False,
) -> None:
    """Embedded demo: SQLite, in-process tasks, a simulated fleet, the dashboard."""
    # Lazy, for start-up time: the demo loads the whole controller (~2 s).
    from controller.cli.demo import run_demo

    result = run_demo(port=port, serve=serve, bake=bake, verbose=verbose)
    expected = {
        "detector-1-1": "Succeeded",
        "detector-1-2": "RolledBack",
        "detector-1-1-auto": "Succeeded",
    }
    if not serve and result != expected:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
