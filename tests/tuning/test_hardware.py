"""The hardware probe: the host always; the GPUs through NVML (a stand-in module here), with
queries a GPU does not support answered as unknown; a clear notice when NVML is unavailable."""

from types import SimpleNamespace

from pipemax.tuning.hardware import Hardware, probe


class NVMLError(Exception):
    pass


def fake_nvml(gpus, fail_init=False, nvlink_up=0):
    """A pynvml stand-in with `gpus` = [(name, bytes, (gen, width) or None)]."""
    def unsupported(*args):
        raise NVMLError("Not Supported")

    def nvlink_state(handle, link):
        if link >= 4:
            raise NVMLError("Invalid Argument")
        return 1 if link < nvlink_up else 0

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def link(which):
        def query(handle):
            pcie = gpus[handle][2]
            if pcie is None:
                raise NVMLError("Not Supported")
            return pcie[which]
        return query

    return SimpleNamespace(
        NVMLError=NVMLError, NVML_NVLINK_MAX_LINKS=18, nvmlInit=init, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"575.57.08", nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda index: index, nvmlDeviceGetName=lambda handle: gpus[handle][0],
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=gpus[handle][1]),
        nvmlDeviceGetMaxPcieLinkGeneration=link(0), nvmlDeviceGetMaxPcieLinkWidth=link(1),
        nvmlDeviceGetNvLinkState=nvlink_state if nvlink_up else unsupported,
        nvmlDeviceGetCudaComputeCapability=lambda handle: (8, 9),
    )


def test_a_pcie_server_is_described_as_such():
    nvml = fake_nvml([("NVIDIA L20", 48 * 2**30, (4, 16)), ("NVIDIA L20", 48 * 2**30, None)])
    hardware = probe(nvml)
    assert hardware.driver == "575.57.08" and len(hardware.gpus) == 2 and not hardware.nvlink
    first, second = hardware.gpus
    assert first.name == "NVIDIA L20" and first.memory_bytes == 48 * 2**30 and first.compute_capability == (8, 9)
    assert abs(first.pcie_gbs - 31.5) < 0.1 and second.pcie_gbs is None  # an unsupported query: unknown
    text = "\n".join(hardware.describe())
    assert "no NVLink" in text and "PCIe 4.0 x16 (32 GB/s each way)" in text and "PCIe link unknown" in text


def test_nvlink_links_are_counted():
    hardware = probe(fake_nvml([("NVIDIA H100 80GB HBM3", 80 * 2**30, (5, 16))], nvlink_up=2))
    assert hardware.nvlink and hardware.gpus[0].nvlink_links == 2


def test_without_nvml_the_host_is_still_probed_and_the_notice_is_clear():
    hardware = probe(fake_nvml([], fail_init=True))
    assert not hardware.gpus and "Library Not Found" in hardware.nvml_error
    assert hardware.host.memory_bytes > 0 and hardware.host.cores >= 1
    assert "NVML is unavailable" in "\n".join(hardware.describe())
    assert Hardware(**{**hardware.to_dict(), "host": hardware.host}).nvml_error == hardware.nvml_error


def test_the_real_probe_runs_on_this_machine():
    hardware = probe()  # pynvml itself: a driver's GPUs, or (no driver) the notice
    assert hardware.host.cores >= 1
    assert hardware.gpus or hardware.nvml_error
