from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.contract import NodeStatus
from node_agent.sysinfo import SystemProbe, cpu_model


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


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R)  Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme

processor\t: 1
model name\t: Intel(R) Xeon(R)  Gold 6230 CPU @ 2.10GHz
"""

PI_CPUINFO = """processor\t: 0
model name\t: ARMv7 Processor rev 3 (v7l)
BogoMIPS\t: 108.00
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU part\t: 0xd08

Hardware\t: BCM2711
Revision\t: c03114
Serial\t\t: 100000002b6a2f2f
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

ARM64_CPUINFO = """processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd04
"""


@pytest.mark.parametrize(
    ("cpuinfo", "device_tree", "expected"),
    [
        (X86_CPUINFO, None, "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"),
        (PI_CPUINFO, None, "Raspberry Pi 4 Model B Rev 1.4"),
        (
            PI_CPUINFO.replace("Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n", ""),
            None,
            "ARMv7 Processor rev 3 (v7l)",
        ),
        (
            ARM64_CPUINFO,
            b"NVIDIA Jetson Nano Developer Kit\x00",
            "NVIDIA Jetson Nano Developer Kit",
        ),
        (ARM64_CPUINFO, None, "Cortex-A35"),
        (
            ARM64_CPUINFO.replace("0xd04", "0x004").replace("0x41", "0x4e"),
            None,
            "CPU implementer 0x4e part 0x004",
        ),
        ("processor\t: 0\nBogoMIPS\t: 50.00\n", None, None),
        ("", None, None),
        (
            "Hardware\t: Qualcomm Technologies, Inc SM8150\n",
            None,
            "Qualcomm Technologies, Inc SM8150",
        ),
        (f"model name\t: {'x' * 300}\n", None, "x" * 200),
    ],
)
def test_cpu_model_from_cpuinfo(
    tmp_path: Path, cpuinfo: str, device_tree: bytes | None, expected: str | None
) -> None:
    proc, sys = fake_node(tmp_path, busy=1, idle=1, temps={})
    (proc / "cpuinfo").write_text(cpuinfo)
    if device_tree is not None:
        (proc / "device-tree").mkdir()
        (proc / "device-tree" / "model").write_bytes(device_tree)
    assert cpu_model(proc) == expected
    probe = SystemProbe(tmp_path, proc_root=proc, sys_root=sys)
    assert probe.status().cpu_model == expected
    if expected is not None:  # what the heartbeat carries fits the contract
        NodeStatus.model_validate(probe.status().model_dump())


def test_cpu_model_is_read_once(tmp_path: Path) -> None:
    proc, sys = fake_node(tmp_path, busy=1, idle=1, temps={})
    (proc / "cpuinfo").write_text(X86_CPUINFO)
    probe = SystemProbe(tmp_path, proc_root=proc, sys_root=sys)
    (proc / "cpuinfo").unlink()
    assert probe.status().cpu_model == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"


def test_real_node_names_its_cpu(tmp_path: Path) -> None:
    # Linux only, like the agent: a missing /proc/cpuinfo is a failure, not a skip.
    assert Path("/proc/cpuinfo").is_file()
    assert SystemProbe(tmp_path).status().cpu_model
