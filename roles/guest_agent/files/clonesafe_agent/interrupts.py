# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Interrupts and vCPUs: where the channel's interrupt is steered and where it arrived."""

from __future__ import annotations

import os
import typing as t

from .files import read_bytes


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.extend(range(int(low), int(high) + 1))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


def parse_interrupts(text: str) -> tuple[list[int], dict[str, dict[str, t.Any]]]:
    """/proc/interrupts -> (CPU numbers of the columns, {irq: {"per_cpu": [...], "name": str}})."""
    lines = text.splitlines()
    if not lines:
        return [], {}
    cpus = [int(token[3:]) for token in lines[0].split() if token.startswith("CPU")]
    table = {}
    for line in lines[1:]:
        label, _sep, rest = line.partition(":")
        fields = rest.split()
        counts = []
        for field in fields[: len(cpus)]:
            if not field.isdigit():
                break
            counts.append(int(field))
        table[label.strip()] = {"per_cpu": counts, "name": " ".join(fields[len(counts):])}
    return cpus, table


class InterruptSteering:
    """The channel's interrupt inside the guest: which vCPUs it is steered to, and where it arrived.

    ``path`` maps a guest path to the agent's root; ``config`` is the agent configuration (``port``,
    ``vcpus``, ``vmgenid_gpe``).
    """

    def __init__(self, path: t.Callable[[str], str], config: dict[str, t.Any]) -> None:
        self.path = path
        self.config = config
        self.registration_error: str | None = None
        self._channel_device: str | None = None

    def online_cpus(self) -> list[int]:
        """Online vCPUs."""
        data = read_bytes(self.path("/sys/devices/system/cpu/online"))
        return parse_cpu_list(data.decode()) if data else []

    def interrupts(self) -> tuple[list[int], dict[str, dict[str, t.Any]]]:
        """Parsed /proc/interrupts."""
        data = read_bytes(self.path("/proc/interrupts"))
        return parse_interrupts(data.decode("ascii", "replace")) if data else ([], {})

    def channel_device(self, cached: bool = True) -> str | None:
        """The virtio device (virtioN) behind the agent's port.

        Remembered once found: resolving the two symlink chains costs some twenty system calls,
        and every request needs the answer. channel_irqs() looks again when the IRQs are gone.
        """
        if cached and self._channel_device is not None:
            return self._channel_device
        port = self.path(self.config["port"])
        if not os.path.exists(port):
            return None
        vport = os.path.basename(os.path.realpath(port))
        device = os.path.realpath(self.path(f"/sys/class/virtio-ports/{vport}/device"))
        name = os.path.basename(device)
        self._channel_device = name if name.startswith("virtio") else None
        return self._channel_device

    def channel_irqs(self, table: dict[str, dict[str, t.Any]]) -> list[int]:
        """IRQs of the channel's virtio device, receive queues first."""
        found = self._irqs_of(self.channel_device(), table)
        if not found and self._channel_device is not None:  # the device may have been replaced
            found = self._irqs_of(self.channel_device(cached=False), table)
        return found

    @staticmethod
    def _irqs_of(device: str | None, table: dict[str, dict[str, t.Any]]) -> list[int]:
        if device is None:
            return []
        found = []
        for label, row in table.items():
            if not label.isdigit():
                continue
            tokens = row["name"].split()
            if any(token == device or token.startswith(device + "-") for token in tokens):
                found.append((0 if "input" in row["name"] else 1, int(label)))
        return [irq for _order, irq in sorted(found)]

    @staticmethod
    def acpi_irq(table: dict[str, dict[str, t.Any]]) -> int | None:
        """The ACPI SCI's IRQ."""
        for label, row in table.items():
            if label.isdigit() and row["name"].split()[-1:] == ["acpi"]:
                return int(label)
        return None

    def affinity(self, irq: int) -> list[int]:
        """The vCPUs an IRQ is steered to."""
        data = read_bytes(self.path(f"/proc/irq/{irq}/smp_affinity_list"))
        return parse_cpu_list(data.decode()) if data else []

    def register_vcpus(self) -> None:
        """Steer the channel's interrupts to the configured vCPUs (default: all online)."""
        online = self.online_cpus()
        wanted = online if self.config["vcpus"] == "all" else sorted(set(self.config["vcpus"]) & set(online))
        _cpus, table = self.interrupts()
        irqs = self.channel_irqs(table)
        self.registration_error = None
        if not irqs:
            self.registration_error = "the channel's interrupt was not found in /proc/interrupts"
            return
        if not wanted:
            self.registration_error = "no configured vCPU is online"
            return
        failures = []
        for irq in irqs:
            try:
                with open(self.path(f"/proc/irq/{irq}/smp_affinity_list"), "w", encoding="ascii") as handle:
                    handle.write(",".join(str(cpu) for cpu in wanted) + "\n")
            except OSError as error:
                failures.append(f"IRQ {irq}: {error.strerror}")
        if failures:
            self.registration_error = "cannot steer " + "; ".join(failures)

    def per_cpu(self, cpus: list[int], table: dict[str, dict[str, t.Any]], irqs: list[int]) -> list[int]:
        """Summed counts of ``irqs`` per vCPU, indexed by vCPU number."""
        width = (max(cpus) + 1) if cpus else 0
        totals = [0] * width
        for irq in irqs:
            for column, count in enumerate(table.get(str(irq), {}).get("per_cpu", [])):
                if column < len(cpus):
                    totals[cpus[column]] += count
        return totals

    def gpe_count(self) -> int | None:
        """How often the VM Generation ID GPE fired."""
        data = read_bytes(self.path(f"/sys/firmware/acpi/interrupts/{self.config['vmgenid_gpe']}"))
        fields = data.split() if data else []
        return int(fields[0]) if fields and fields[0].isdigit() else None

    def channel_interrupts(self) -> list[int]:
        """Per-vCPU counts of the channel's interrupts, now."""
        cpus, table = self.interrupts()
        return self.per_cpu(cpus, table, self.channel_irqs(table))
