"""The NVML boundary: Protocol conformance, pynvml error translation, and FakeNvml's own contract."""

from __future__ import annotations

import ctypes
import inspect
import json
from pathlib import Path

import pynvml
import pytest

from gpu_support import collect_into, exposition
from trainwarden import nvml
from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.gpu import GpuCollector, GpuOptions
from trainwarden.fixture_switch import load_nvml
from trainwarden.testing import FakeNvml, FixtureError, capture_snapshot, main


def protocol_methods() -> set[str]:
    return {name for name, _ in inspect.getmembers(nvml.Nvml, inspect.isfunction) if not name.startswith("_")}


def test_fake_and_binding_implement_exactly_the_protocol() -> None:
    """FakeNvml and PynvmlBinding offer every Protocol call with its parameters, the fake no extra call."""
    wanted = protocol_methods()
    assert "device_get_field_values" in wanted
    for impl in (FakeNvml, nvml.PynvmlBinding):
        for name in wanted:
            expected = list(inspect.signature(getattr(nvml.Nvml, name)).parameters)
            assert list(inspect.signature(getattr(impl, name)).parameters) == expected, (impl.__name__, name)
    fake_nvml_calls = {n for n in vars(FakeNvml) if n.startswith(("device_", "event_", "system_"))}
    assert fake_nvml_calls == {n for n in wanted if n.startswith(("device_", "event_", "system_"))}


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, nvml.NvmlNotSupportedError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, nvml.NvmlGpuLostError),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, nvml.NvmlLibraryNotFoundError),
        (pynvml.NVML_ERROR_TIMEOUT, nvml.NvmlTimeoutError),
        (pynvml.NVML_ERROR_RESET_REQUIRED, nvml.NvmlResetRequiredError),
    ],
)
def test_binding_translates_pynvml_errors(code: int, cls: type[nvml.NvmlError]) -> None:
    """A real pynvml.NVMLError_* inside a call comes out as the matching NvmlError naming the call."""
    binding = nvml.PynvmlBinding()

    def failing() -> None:
        raise pynvml.NVMLError(code)

    with pytest.raises(cls) as info:
        binding._call("nvmlDeviceGetPowerUsage", failing)
    assert info.value.code == code
    assert "nvmlDeviceGetPowerUsage" in str(info.value)


def test_unknown_codes_keep_their_number() -> None:
    """An NVML code without a dedicated class still carries its code and a readable name."""
    err = nvml.nvml_error(nvml.ERROR_NO_DATA, "field 94")
    assert type(err) is nvml.NvmlError
    assert err.code == nvml.ERROR_NO_DATA
    assert err.name == "no_data"
    assert "field 94" in str(err)


def test_fake_refuses_calls_before_init() -> None:
    """As the real library does, a query before nvmlInit fails with Uninitialized."""
    fake = FakeNvml.shipped("a100-sxm4-4gpu")
    with pytest.raises(nvml.NvmlError, match="uninitialized"):
        fake.device_get_count()


def test_fake_reports_absent_fields_as_not_supported() -> None:
    """A field id the snapshot does not list reads NOT_SUPPORTED in its own entry, not as a call failure."""
    fake = FakeNvml.shipped("h100-sxm-8gpu")
    fake.init()
    handle = fake.device_get_handle_by_index(0)
    values = fake.device_get_field_values(handle, [nvml.FI_ECC_DBE_VOL_TOTAL, 9999])
    assert values[0].value == 0
    assert isinstance(values[1].error, nvml.NvmlNotSupportedError)


def test_fake_event_wait_times_out() -> None:
    """An event set with nothing pending raises NvmlTimeoutError after the wait, as nvmlEventSetWait does."""
    fake = FakeNvml.shipped("h100-sxm-8gpu")
    fake.init()
    event_set = fake.event_set_create()
    with pytest.raises(nvml.NvmlTimeoutError):
        fake.event_set_wait(event_set, 10)


def test_fake_rejects_registering_unsupported_event_types() -> None:
    """Registering an event type the GPU does not support fails as the driver does."""
    fake = FakeNvml.shipped("t4-not-supported")
    fake.init()
    handle = fake.device_get_handle_by_index(0)
    with pytest.raises(nvml.NvmlNotSupportedError):
        fake.device_register_events(handle, nvml.EVENT_GPU_RECOVERY_ACTION, fake.event_set_create())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "must be a JSON object"),
        ("{not json", "not JSON"),
        ('{"gpus": [{"index": 0, "uuid": "u", "name": "n"}]}', "lacks 'pci_bus_id'"),
        (
            '{"gpus": [{"index": 1, "uuid": "u", "name": "n", "pci_bus_id": "p"}]}',
            r"gpus\[0\].index must be 0",
        ),
        ('{"init_error": "BROKEN", "gpus": []}', "not an NVML error name"),
    ],
)
def test_bad_fixtures_name_the_file_and_the_problem(tmp_path: Path, content: str, message: str) -> None:
    """A malformed fixture raises FixtureError naming the file and what is wrong."""
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FixtureError, match=message) as info:
        FakeNvml.from_fixture(path)
    assert str(path) in str(info.value)


def test_load_nvml_takes_a_path(tmp_path: Path) -> None:
    """TRAINWARDEN_NVML_FIXTURE may name any JSON file, e.g. a snapshot kept from a real node."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"driver_version": "999.1", "gpus": []}))
    api = load_nvml({nvml.FIXTURE_ENV: str(path)})
    assert isinstance(api, FakeNvml)
    api.init()
    assert api.system_get_driver_version() == "999.1"
    assert isinstance(load_nvml({}), nvml.PynvmlBinding)


def test_shipped_fixtures_are_package_data() -> None:
    """The snapshots live inside the package (setuptools package-data), so `pip install` ships them."""
    names = {p.stem for p in nvml.FIXTURE_DIR.glob("*.json")}
    assert {"h100-sxm-8gpu", "a100-sxm4-4gpu", "t4-not-supported", "h100-lost-gpu", "no-driver"} <= names
    assert nvml.FIXTURE_DIR.is_relative_to(Path(nvml.__file__).parent)


@pytest.mark.parametrize("fixture", ["h100-sxm-8gpu", "t4-not-supported", "h100-lost-gpu"])
def test_a_captured_snapshot_reproduces_the_node(fixture: str) -> None:
    """A node captured with capture_snapshot and loaded back into FakeNvml renders the same exposition."""

    def render(api: FakeNvml) -> str:
        collector = GpuCollector(GpuOptions(events=False), CollectorContext(), api)
        collector.start()
        try:
            return exposition(collect_into(collector))
        finally:
            collector.close()

    original = FakeNvml.shipped(fixture)
    snapshot = json.loads(json.dumps(capture_snapshot(original, "round trip")))
    assert original.calls["shutdown"] == 1
    assert render(FakeNvml(snapshot)) == render(FakeNvml.shipped(fixture))


def test_snapshot_command_without_a_driver_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m trainwarden.testing nvml-snapshot` on a GPU-less host exits 1 naming the NVML error."""
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is present")
    assert main(["nvml-snapshot"]) == 1
    assert "NVML shared library not found" in capsys.readouterr().err
    assert main([]) == 2


# --- the real binding's decoding, on pynvml's own ctypes structures ------------------------------


def test_binding_decodes_field_values_by_type_and_return_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Field values come from the union member their valueType names; a per-field error is an NvmlError."""
    values = (pynvml.c_nvmlFieldValue_t * 4)()
    for slot, (field_id, value_type, member, value, ret) in enumerate(
        [
            (nvml.FI_ECC_SBE_AGG_TOTAL, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 7, 0),
            (
                nvml.FI_MEMORY_TEMP,
                pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                "uiVal",
                0,
                pynvml.NVML_ERROR_NOT_SUPPORTED,
            ),
            (nvml.FI_GET_GPU_RECOVERY_ACTION, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 2, 0),
            (9999, pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", 1.5, 0),
        ]
    ):
        values[slot].fieldId = field_id
        values[slot].valueType = value_type
        values[slot].nvmlReturn = ret
        setattr(values[slot].value, member, value)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", lambda handle, ids: values)
    decoded = nvml.PynvmlBinding().device_get_field_values(object(), [3])
    assert [(f.field_id, f.value) for f in decoded] == [(5, 7.0), (82, None), (230, 2.0), (9999, 1.5)]
    assert isinstance(decoded[1].error, nvml.NvmlNotSupportedError)


def test_binding_reads_bus_id_and_unattributed_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PCI bus id comes back as text, and NVML_VALUE_NOT_AVAILABLE process memory as None."""
    info = pynvml.nvmlPciInfo_t()
    info.busId = b"00000000:18:00.0"
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPciInfo", lambda handle: info)
    procs = [pynvml.c_nvmlProcessInfo_t(), pynvml.c_nvmlProcessInfo_t()]
    procs[0].pid, procs[0].usedGpuMemory = 41001, 5 << 30
    procs[1].pid, procs[1].usedGpuMemory = 7001, nvml.VALUE_NOT_AVAILABLE
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda handle: procs)
    binding = nvml.PynvmlBinding()
    assert binding.device_get_pci_bus_id(object()) == "00000000:18:00.0"
    assert binding.device_get_compute_running_processes(object()) == [
        nvml.ProcessInfo(41001, 5 << 30),
        nvml.ProcessInfo(7001, None),
    ]


def test_event_device_pointer_matches_the_handle_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event's fresh ctypes device pointer maps back to our handle by address, not object identity."""
    device = pynvml.struct_c_nvmlDevice_t()
    handle = ctypes.pointer(device)
    data = pynvml.c_nvmlEventData_t()
    data.device = ctypes.pointer(device)
    data.eventType = pynvml.nvmlEventTypeXidCriticalError
    data.eventData = 79
    monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", lambda event_set, timeout: data)
    event = nvml.PynvmlBinding().event_set_wait(object(), 10)
    assert event.device is not handle
    assert nvml.handle_key(event.device) == nvml.handle_key(handle)
    assert nvml.handle_key(ctypes.pointer(pynvml.struct_c_nvmlDevice_t())) != nvml.handle_key(handle)
    assert (event.event_type, event.event_data) == (nvml.EVENT_XID_CRITICAL, 79)
