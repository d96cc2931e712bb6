from __future__ import annotations

from pathlib import Path

from node_agent.sysinfo import SystemProbe


def fake_node(root: Path, *, busy: int, idle: int, temps: dict[str, str]) -> tuple[Path, Path]:
    proc, sys = root / "proc", root / "sys"
    proc.mkdir(exist_ok=True)
    # user nice system idle iowait irq softirq steal guest guest_nice
    (proc / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 50 0\ncpu0 1 2 3 4\n")
    (proc / "meminfo").write_text(
        "MemTotal:        4000000 kB\nMemFree:          500000 kB\nMemAvailable:    1000000 kB\n"
    )
    for zone, value in temps.items():
        (sys / "class" / "thermal" / zone).mkdir(parents=True, exist_ok=True)
        (sys / "class" / "thermal" / zone / "temp").write_text(value)
    return proc, sys


def test_status_from_proc_and_sys(tmp_path: Path) -> None:
    temps = {"thermal_zone0": "48500\n", "thermal_zone1": "61250\n", "thermal_zone2": "bad"}
    proc, sys = fake_node(tmp_path, busy=1000, idle=9000, temps=temps)
    probe = SystemProbe(tmp_path, agent_version="1.2.3", proc_root=proc, sys_root=sys)
    fake_node(tmp_path, busy=1250, idle=9750, temps={})  # 250 busy of 1000 jiffies since
    status = probe.status()
    assert status.cpu_percent == 25.0
    assert status.memory_total_bytes == 4_000_000 * 1024
    assert status.memory_used_bytes == 3_000_000 * 1024
    assert status.temperature_c == 61.25
    assert status.disk_free_bytes is not None
    assert status.disk_free_bytes > 0
    assert status.agent_version == "1.2.3"
    # No time passed: no rate to report.
    assert probe.status().cpu_percent is None


def test_missing_sources_are_unknown(tmp_path: Path) -> None:
    probe = SystemProbe(
        tmp_path / "gone", proc_root=tmp_path / "no-proc", sys_root=tmp_path / "no-sys"
    )
    status = probe.status()
    assert status.model_dump(exclude_none=True) == {}


def test_real_node(tmp_path: Path) -> None:
    probe = SystemProbe(tmp_path)
    status = probe.status()
    assert status.memory_total_bytes
    assert status.memory_used_bytes is not None
    assert status.disk_free_bytes is not None
