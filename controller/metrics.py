"""Prometheus metrics of the controller (one registry: the client's default; in the
processes of a Celery worker or of ``edgefleet server --workers N``, prometheus_client's
multiprocess mode, ``controller/kit/multiprocess.py``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Histogram(
    "edgefleet_http_request_duration_seconds",
    "HTTP request latency by route template and status class.",
    ["method", "route", "status"],
)
MODEL_PUSHES = Counter(
    "edgefleet_model_pushes_total", "Model version pushes by result.", ["result"]
)
MODEL_VALIDATIONS = Counter(
    "edgefleet_model_validations_total", "Model version validations by result.", ["result"]
)
ROLLOUT_TRANSITIONS = Counter(
    "edgefleet_rollout_transitions_total", "Rollout phase transitions.", ["from_phase", "to_phase"]
)
GATE_EVALUATIONS = Counter(
    "edgefleet_gate_evaluations_total", "Gate evaluations by decision.", ["decision"]
)
# Fleet-wide state, read from the database at scrape time (every replica reports the
# same numbers: aggregate with max() in PromQL). Under `edgefleet server --workers N`
# (multiprocess mode) the process that answers the scrape has just counted: its values,
# the most recent, are the ones served (a mode the single-process registry ignores).
ROLLOUTS = Gauge(
    "edgefleet_rollouts", "Rollouts by phase.", ["phase"], multiprocess_mode="mostrecent"
)
NODES = Gauge("edgefleet_nodes", "Nodes by health.", ["health"], multiprocess_mode="mostrecent")
MODEL_VERSIONS = Gauge(
    "edgefleet_model_versions",
    "Model versions by status.",
    ["status"],
    multiprocess_mode="mostrecent",
)
# When each of beat's periodic tasks last finished without an error, counted where it
# ran (a Celery worker's pool process). A silent beat, or no worker taking its tasks,
# shows as this falling behind the clock: alert on `time() - max by (task) (...)`.
# "max" over the worker's processes: the latest run of any, kept after its process exits.
PERIODIC_TASK_SUCCESS = Gauge(
    "edgefleet_periodic_task_last_success_timestamp_seconds",
    "When each periodic task (beat's schedule) last finished without an error, in Unix time.",
    ["task"],
    multiprocess_mode="max",
)
