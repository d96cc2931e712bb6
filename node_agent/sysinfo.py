"""Node status from /proc and /sys: a few small file reads per heartbeat, no psutil.

Inside the agent's container /proc/stat and /proc/meminfo still describe the whole node
(they are not namespaced), which is what the controller wants to know. Anything that
cannot be read is reported as unknown (None), never guessed."""

from __future__ import annotations

import os
from pathlib import Path

from node_agent.contract import NodeStatus


def _cpu_times(proc: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot."""
    try:
        with open(proc / "stat", encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # already counted in user/nice, so only the first eight add up to the total.
    total = sum(values[:8])
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def _meminfo(proc: Path) -> tuple[int, int] | None:
    """(used, total) bytes; used excludes what the kernel can reclaim (MemAvailable)."""
    fields: dict[str, int] = {}
    try:
        with open(proc / "meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    fields[key] = int(rest.split()[0]) * 1024
                    if len(fields) == 2:
                        break
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) != 2:
        return None
    return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]


def _temperature_c(sys_root: Path) -> float | None:
    """The hottest thermal zone: on edge boards the SoC zone is the one that throttles."""
    hottest: float | None = None
    base = sys_root / "class" / "thermal"
    try:
        zones = [z for z in os.listdir(base) if z.startswith("thermal_zone")]
    except OSError:
        return None
    for zone in zones:
        try:
            with open(base / zone / "temp", encoding="ascii") as f:
                value = int(f.read().strip()) / 1000.0
        except (OSError, ValueError):
            continue  # some zones (disabled sensors) refuse reads
        if hottest is None or value > hottest:
            hottest = value
    return hottest


# /proc/cpuinfo keys naming the processor, best first. x86 has "model name" (its "model"
# is a number). ARM kernels print "model name" as a generic "ARMv7 Processor rev 3 (v7l)",
# so the board's "Model" (Raspberry Pi: "Raspberry Pi 4 Model B Rev 1.4") is preferred,
# then the SoC ("Hardware: BCM2835"); "cpu model" is MIPS, "Processor" old ARM kernels.
# Keys are matched exactly, case included.
_CPUINFO_KEYS = ("Model", "model name", "Hardware", "cpu model", "Processor")
# Last resort on arm64 without a device tree (ACPI servers): the core, from "CPU
# implementer" and "CPU part" (Arm Ltd's parts, as lscpu names them).
_ARM_CORES = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}
CPU_MODEL_MAX = 200  # NodeStatus.cpu_model's limit


def cpu_model(proc: Path) -> str | None:
    """The node's CPU model from ``<proc>/cpuinfo``. On ARM boards whose cpuinfo names
    nothing (most arm64 kernels: Jetson, generic boards), the device tree's board model;
    without one, the core type."""
    found: dict[str, str] = {}
    try:
        with open(proc / "cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key, value = key.strip(), " ".join(value.split())
                if sep and value:
                    found.setdefault(key, value)
    except OSError:
        pass
    for key in _CPUINFO_KEYS:
        if key in found:
            return found[key][:CPU_MODEL_MAX]
    try:  # /proc/device-tree -> /sys/firmware/devicetree/base; NUL-terminated
        with open(proc / "device-tree" / "model", "rb") as fb:
            board = " ".join(fb.read(4096).decode("utf-8", "replace").strip("\x00").split())
        if board:
            return board[:CPU_MODEL_MAX]
    except OSError:
        pass
    implementer, part = found.get("CPU implementer"), found.get("CPU part")
    if implementer is None or part is None:
        return None
    if implementer.lower() == "0x41" and part.lower() in _ARM_CORES:
        return _ARM_CORES[part.lower()]
    return f"CPU implementer {implementer} part {part}"


def _disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SystemProbe:
    """CPU utilisation is a rate: each call reports the share of busy time since the
    previous call (the heartbeat window), over all cores, 0-100."""

    def __init__(
        self,
        disk_path: Path,
        *,
        agent_version: str | None = None,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
    ) -> None:
        self.disk_path = disk_path
        self.agent_version = agent_version
        self.proc_root = proc_root
        self.sys_root = sys_root
        self._last_cpu = _cpu_times(proc_root)
        self.cpu_model = cpu_model(proc_root)  # read once: it does not change

    def cpu_percent(self) -> float | None:
        now = _cpu_times(self.proc_root)
        last, self._last_cpu = self._last_cpu, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        busy = max(0, now[0] - last[0])
        return round(100.0 * busy / (now[1] - last[1]), 2)

    def status(self) -> NodeStatus:
        mem = _meminfo(self.proc_root)
        return NodeStatus(
            cpu_percent=self.cpu_percent(),
            memory_used_bytes=mem[0] if mem else None,
            memory_total_bytes=mem[1] if mem else None,
            disk_free_bytes=_disk_free(self.disk_path),
            temperature_c=_temperature_c(self.sys_root),
            agent_version=self.agent_version,
            cpu_model=self.cpu_model,
        )
