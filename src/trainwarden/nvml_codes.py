"""NVML's numbers as trainwarden uses them: return codes, query constants, field ids, event types.

Plain constants with values from nvml.h (they match pynvml's), kept apart from the binding so the
errors, the fake NVML and the collector share one copy without importing each other.
"""

from __future__ import annotations

# NVML return codes (nvml.h `nvmlReturn_t`); values match pynvml's NVML_ERROR_* constants.
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_NO_DATA = 21
ERROR_UNKNOWN = 999

# Enum values used as call arguments (nvml.h).
TEMPERATURE_GPU = 0
CLOCK_SM = 1
CLOCK_MEM = 2
PCIE_UTIL_TX_BYTES = 0
PCIE_UTIL_RX_BYTES = 1

# Field ids for nvmlDeviceGetFieldValues (nvml.h NVML_FI_DEV_*).
FI_ECC_SBE_VOL_TOTAL = 3
FI_ECC_DBE_VOL_TOTAL = 4
FI_ECC_SBE_AGG_TOTAL = 5
FI_ECC_DBE_AGG_TOTAL = 6
FI_RETIRED_SBE = 29
FI_RETIRED_DBE = 30
FI_RETIRED_PENDING = 31
FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
FI_MEMORY_TEMP = 82
FI_PCIE_REPLAY_COUNTER = 94
FI_PCIE_COUNT_TX_BYTES = 197
FI_PCIE_COUNT_RX_BYTES = 198
FI_GET_GPU_RECOVERY_ACTION = 230

# Event types (nvml.h nvmlEventType*).
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID_CRITICAL = 0x8
EVENT_GPU_UNAVAILABLE = 0x4000
EVENT_GPU_RECOVERY_ACTION = 0x8000

# Clock event (throttle) reasons (nvml.h nvmlClocksEventReason*): bit → our label value.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# GPU recovery actions (nvml.h nvmlDeviceGpuRecoveryAction_t).
RECOVERY_ACTIONS: dict[int, str] = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}

VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF
"""NVML_VALUE_NOT_AVAILABLE: what usedGpuMemory reads when the driver cannot attribute memory."""

# The field ids trainwarden reads in one nvmlDeviceGetFieldValues call per GPU, grouped by what they
# count (the GPU collector turns each into a series; a captured snapshot records exactly these).
ECC_FIELDS: dict[int, tuple[str, str]] = {
    FI_ECC_SBE_VOL_TOTAL: ("corrected", "volatile"),
    FI_ECC_DBE_VOL_TOTAL: ("uncorrected", "volatile"),
    FI_ECC_SBE_AGG_TOTAL: ("corrected", "aggregate"),
    FI_ECC_DBE_AGG_TOTAL: ("uncorrected", "aggregate"),
}
NVLINK_FIELDS: dict[int, str] = {
    FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: "crc_flit",
    FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL: "crc_data",
    FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL: "replay",
    FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL: "recovery",
}
RETIRED_FIELDS: dict[int, str] = {FI_RETIRED_SBE: "single_bit_ecc", FI_RETIRED_DBE: "double_bit_ecc"}
PCIE_BYTE_FIELDS: dict[int, str] = {FI_PCIE_COUNT_TX_BYTES: "tx", FI_PCIE_COUNT_RX_BYTES: "rx"}
FIELD_IDS: tuple[int, ...] = (
    *ECC_FIELDS,
    *NVLINK_FIELDS,
    *RETIRED_FIELDS,
    FI_RETIRED_PENDING,
    FI_MEMORY_TEMP,
    FI_PCIE_REPLAY_COUNTER,
    *PCIE_BYTE_FIELDS,
    FI_GET_GPU_RECOVERY_ACTION,
)
