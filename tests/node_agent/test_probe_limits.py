"""The probe child's memory and CPU limits, through the real launcher, and how a child
that dies without a verdict is reported."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp
from node_agent.probe import (
    ProbeFailed,
    ProbeLimits,
    ProbeRequest,
    probe_model,
)
from node_agent.probe_launcher import DEFAULT_MEMORY_LIMIT_MB, crash_reason
from tests.hostile_models import cpu_burner, litert_memory_bomb, memory_bomb

MEMORY_REASON = (
    f"the model exceeded the memory limit of {DEFAULT_MEMORY_LIMIT_MB} MiB "
    "(EDGEFLEET_PROBE_MEMORY_LIMIT_MB): "
)


def _write(tmp_path: Path, data: bytes, name: str = "model.onnx") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_defaults_hold_the_child() -> None:
    limits = ProbeRequest(path="m.onnx", format="onnx").limits
    assert limits.memory_mb == DEFAULT_MEMORY_LIMIT_MB == 2048
    assert limits.cpu_s is not None


def test_memory_bomb_is_refused_under_the_default_limit(tmp_path: Path) -> None:
    req = ProbeRequest(path=_write(tmp_path, memory_bomb()), format="onnx", runs=2)
    result = probe_model(req, timeout_s=120)
    validation = result["validation"]
    assert validation["passed"] is False
    assert validation["error"].startswith(MEMORY_REASON + "inference failed:"), validation
    # onnxruntime's own words for the refused 4 GB buffer follow the limit's.
    refused = "Failed to allocate memory for requested buffer of size 4000000000"
    assert refused in validation["error"]
    assert result["benchmark"] is None


def test_litert_memory_bomb_is_refused(tmp_path: Path) -> None:
    """LiteRT's arena fails with an empty RuntimeError: the reason still points at the
    limit and its setting."""
    req = ProbeRequest(
        path=_write(tmp_path, litert_memory_bomb(), "model.tflite"), format="tflite", runs=2
    )
    result = probe_model(req, timeout_s=120)
    error = result["validation"]["error"]
    assert result["validation"]["passed"] is False
    assert error.startswith("load failed: RuntimeError:"), error
    assert f"limit of {DEFAULT_MEMORY_LIMIT_MB} MiB, EDGEFLEET_PROBE_MEMORY_LIMIT_MB" in error


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_normal_models_pass_under_a_tight_memory_limit(
    tmp_path: Path, fmt: str, threads: int
) -> None:
    """A quarter of the default, with threads: RLIMIT_DATA does not count the address
    space threads reserve (RLIMIT_AS would: 716 MiB at 8 threads for the CNN)."""
    data = samples.build_cnn() if fmt == "onnx" else build_tflite_mlp()
    req = ProbeRequest(
        path=_write(tmp_path, data, f"model.{fmt}"),
        format=fmt,
        runs=5,
        warmup_runs=1,
        threads=threads,
        limits=ProbeLimits(memory_mb=512, cpu_s=60),
    )
    result = probe_model(req, timeout_s=120)
    assert result["validation"]["passed"] is True, result["validation"]
    assert result["benchmark"]["runs"] == 5


def test_cpu_limit_ends_a_long_run_with_sigxcpu(tmp_path: Path) -> None:
    req = ProbeRequest(
        path=_write(tmp_path, cpu_burner()),
        format="onnx",
        runs=1000,
        limits=ProbeLimits(cpu_s=2, cpu_setting="EDGEFLEET_BENCHMARK_CPU_LIMIT_S"),
    )
    # The timeout is far beyond the limit: the kill must come from RLIMIT_CPU.
    with pytest.raises(ProbeFailed) as failed:
        probe_model(req, timeout_s=120)
    assert str(failed.value) == (
        "the model exceeded the CPU time limit of 2 s (EDGEFLEET_BENCHMARK_CPU_LIMIT_S): "
        "killed by SIGXCPU"
    )


# A child that dies without a verdict: a sitecustomize on PYTHONPATH (the launcher keeps
# it) acts as the child starts, before the probe reads its request.
CRASHES = {
    "segfault": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    "exit": (
        "import os, sys\n"
        "sys.stderr.write('probe bug: no verdict\\n')\n"
        "sys.stderr.flush()\n"
        "os._exit(3)\n"
    ),
    "bad_alloc": (
        "import os, sys\n"
        "sys.stderr.write(\"terminate called after throwing an instance of 'std::bad_alloc'\\n\")\n"
        "sys.stderr.flush()\n"
        "os.abort()\n"
    ),
    "sigkill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
}


def _crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> str:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHES[kind])
    monkeypatch.setenv("PYTHONPATH", str(hook))
    req = ProbeRequest(path=_write(tmp_path, samples.build_cnn()), format="onnx")
    with pytest.raises(ProbeFailed) as failed:
        probe_model(req, timeout_s=60)
    return str(failed.value)


def test_a_child_killed_by_a_signal_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = _crash(tmp_path, monkeypatch, "segfault")
    assert reason.startswith("runtime crashed (killed by SIGSEGV)"), reason
    assert "limit" not in reason


def test_a_child_exiting_non_zero_names_the_code_and_its_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = _crash(tmp_path, monkeypatch, "exit")
    assert reason == "probe exited with code 3: probe bug: no verdict"


def test_a_child_aborting_on_a_failed_allocation_names_the_memory_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = _crash(tmp_path, monkeypatch, "bad_alloc")
    assert reason.startswith(MEMORY_REASON + "killed by SIGABRT: terminate called"), reason


def test_a_child_killed_by_sigkill_suggests_an_oom_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = _crash(tmp_path, monkeypatch, "sigkill")
    assert reason.startswith("runtime killed by SIGKILL (out of memory in its cgroup"), reason


def test_crash_reasons_without_limits_and_unknown_signals() -> None:
    none = ProbeLimits(memory_mb=None, cpu_s=None)
    # SIGXCPU from a limit the probe did not set (inherited): a crash, not our limit.
    assert crash_reason(-signal.SIGXCPU, "", none) == "runtime crashed (killed by SIGXCPU)"
    assert crash_reason(-200, "?", none) == "runtime crashed (killed by signal 200): ?"
    assert crash_reason(1, "MemoryError\n", none) == (
        "the model ran out of memory: exited with code 1: MemoryError"
    )
