"""What this server is: its GPUs (through NVML, the `nvidia-ml-py` package), their PCIe links and
NVLink, the driver, and the host's memory and cores. `pipemax autotune` starts from this probe and
keys its profiles by it; without a driver (or on a machine with no GPU) the probe still returns
the host and says plainly that NVML is unavailable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

# Usable bandwidth of one PCIe lane, one direction, GB/s (after line encoding), by generation.
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass
class GPUInfo:
    index: int
    name: str
    memory_bytes: int
    pcie_generation: int | None  # the link's maximum for this GPU in this slot
    pcie_width: int | None
    nvlink_links: int  # active NVLink links (0: PCIe only)
    compute_capability: tuple[int, int] | None

    @property
    def pcie_gbs(self) -> float | None:
        """One direction's nominal PCIe bandwidth in GB/s (the copy benchmarks measure the real one)."""
        if not self.pcie_generation or not self.pcie_width:
            return None
        return PCIE_LANE_GBS.get(self.pcie_generation, 0.0) * self.pcie_width


@dataclass
class HostInfo:
    memory_bytes: int
    available_bytes: int
    cores: int


@dataclass
class Hardware:
    host: HostInfo
    gpus: list[GPUInfo] = field(default_factory=list)
    driver: str | None = None
    nvml_error: str | None = None  # why NVML could not be read (no driver, no library)

    @property
    def nvlink(self) -> bool:
        return any(gpu.nvlink_links for gpu in self.gpus)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> list[str]:
        """The probe in plain lines, for autotune's summary."""
        host = self.host
        lines = [f"host: {host.cores} cores, {host.memory_bytes / 2**30:.0f} GiB memory "
                 f"({host.available_bytes / 2**30:.0f} GiB available)"]
        if self.nvml_error is not None:
            lines.append(f"NVML is unavailable ({self.nvml_error}): no GPU information; "
                         "install the NVIDIA driver to probe the GPUs")
            return lines
        lines.append(f"driver {self.driver}, {len(self.gpus)} GPU(s), "
                     f"{'NVLink' if self.nvlink else 'no NVLink: GPUs talk over PCIe'}")
        for gpu in self.gpus:
            link = (f"PCIe {gpu.pcie_generation}.0 x{gpu.pcie_width} ({gpu.pcie_gbs:.0f} GB/s each way)"
                    if gpu.pcie_gbs else "PCIe link unknown")
            lines.append(f"  GPU {gpu.index}: {gpu.name}, {gpu.memory_bytes / 2**30:.0f} GiB, {link}"
                         + (f", {gpu.nvlink_links} NVLink links" if gpu.nvlink_links else ""))
        return lines


def probe_host() -> HostInfo:
    total = available = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, value = line.split(":", 1)
                if name == "MemTotal":
                    total = int(value.split()[0]) * 1024
                elif name == "MemAvailable":
                    available = int(value.split()[0]) * 1024
    except OSError:  # not Linux: what os can say
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        total = available = pages * os.sysconf("SC_PAGE_SIZE") if pages else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostInfo(total, available or total, cores)


def probe(nvml=None) -> Hardware:
    """The server's hardware. nvml: the pynvml module (tests pass a stand-in)."""
    hardware = Hardware(probe_host())
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as error:  # the package is a dependency; say so if it is missing
            hardware.nvml_error = f"the nvidia-ml-py package is not installed: {error}"
            return hardware
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        hardware.nvml_error = str(error) or type(error).__name__
        return hardware
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        hardware.driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        for index in range(nvml.nvmlDeviceGetCount()):
            hardware.gpus.append(_probe_gpu(nvml, index))
    finally:
        nvml.nvmlShutdown()
    return hardware


def _probe_gpu(nvml, index: int) -> GPUInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else str(name)

    def optional(query, *args):  # a query a GPU does not support answers None, not an error
        try:
            return query(handle, *args)
        except nvml.NVMLError:
            return None

    links = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        state = optional(nvml.nvmlDeviceGetNvLinkState, link)
        if state is None:
            break  # no NVLink, or no more links
        links += int(bool(state))
    capability = optional(nvml.nvmlDeviceGetCudaComputeCapability)
    return GPUInfo(index, name, int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                   optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration), optional(nvml.nvmlDeviceGetMaxPcieLinkWidth),
                   links, tuple(capability) if capability is not None else None)
