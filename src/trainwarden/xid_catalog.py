"""What each NVIDIA XID means and what NVIDIA recommends doing about it.

Distilled from NVIDIA's XID catalog (docs.nvidia.com/deploy/xid-errors, "immediate action"), mapped
onto the five things trainwarden can do. Rules and healers call `recommended_action(xid)`; the
collectors only count. An XID not in the catalog gets `RESTART_JOB`: the job saw a driver-level
error, and restarting from a checkpoint is the cheapest step that is always safe; rules escalate
on repetition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class XidAction(enum.StrEnum):
    """What to do after an XID, mildest first (the order is used to pick the strongest)."""

    IGNORE = "ignore"
    RESTART_JOB = "restart_job"
    RESET_GPU = "reset_gpu"
    DRAIN = "drain"
    REBOOT = "reboot"

    @property
    def rank(self) -> int:
        """Position in the mildest-to-strongest order."""
        return list(XidAction).index(self)


@dataclass(frozen=True, slots=True)
class XidInfo:
    """One catalog entry."""

    xid: int
    name: str
    action: XidAction
    hardware: bool
    """True when NVIDIA attributes it to the GPU/board rather than to the application."""
    known: bool = True


_A = XidAction
_CATALOG: dict[int, XidInfo] = {
    info.xid: info
    for info in (
        XidInfo(8, "GPU stopped processing", _A.RESTART_JOB, hardware=False),
        XidInfo(13, "Graphics engine exception", _A.RESTART_JOB, hardware=False),
        XidInfo(31, "GPU memory page fault", _A.RESTART_JOB, hardware=False),
        XidInfo(32, "Invalid or corrupted push buffer stream", _A.RESTART_JOB, hardware=False),
        XidInfo(38, "Driver firmware error", _A.RESET_GPU, hardware=True),
        XidInfo(43, "GPU stopped processing (channel reset)", _A.RESTART_JOB, hardware=False),
        XidInfo(45, "Preemptive cleanup after a previous error", _A.IGNORE, hardware=False),
        XidInfo(48, "Double-bit ECC error", _A.RESET_GPU, hardware=True),
        XidInfo(56, "Display engine error", _A.IGNORE, hardware=False),
        XidInfo(57, "Error programming video memory interface", _A.RESET_GPU, hardware=True),
        XidInfo(58, "Unstable video memory interface", _A.RESET_GPU, hardware=True),
        XidInfo(61, "Internal micro-controller breakpoint/warning", _A.RESET_GPU, hardware=True),
        XidInfo(62, "Internal micro-controller halt", _A.RESET_GPU, hardware=True),
        XidInfo(63, "ECC page retirement or row remapping recorded", _A.RESET_GPU, hardware=True),
        XidInfo(64, "ECC page retirement or row remapping failure", _A.DRAIN, hardware=True),
        XidInfo(68, "Video processor exception", _A.RESTART_JOB, hardware=False),
        XidInfo(69, "Graphics engine class error", _A.RESTART_JOB, hardware=False),
        XidInfo(74, "NVLink error", _A.RESET_GPU, hardware=True),
        XidInfo(79, "GPU has fallen off the bus", _A.REBOOT, hardware=True),
        XidInfo(92, "High single-bit ECC error rate", _A.IGNORE, hardware=True),
        XidInfo(94, "Contained ECC error", _A.RESTART_JOB, hardware=True),
        XidInfo(95, "Uncontained ECC error", _A.RESET_GPU, hardware=True),
        XidInfo(109, "Context switch timeout", _A.RESTART_JOB, hardware=False),
        XidInfo(119, "GSP RPC timeout", _A.RESET_GPU, hardware=True),
        XidInfo(120, "GSP error", _A.RESET_GPU, hardware=True),
        XidInfo(121, "C2C link error", _A.RESET_GPU, hardware=True),
        XidInfo(123, "SPI PMU RPC write failure", _A.RESET_GPU, hardware=True),
        XidInfo(136, "Link training failed", _A.REBOOT, hardware=True),
        XidInfo(140, "Unrecovered ECC error", _A.RESET_GPU, hardware=True),
        XidInfo(143, "GPU initialization failure", _A.REBOOT, hardware=True),
        XidInfo(144, "NVLink SAW error", _A.RESET_GPU, hardware=True),
        XidInfo(145, "NVLink RLW error", _A.RESET_GPU, hardware=True),
        XidInfo(149, "NVLink NETIR error", _A.RESET_GPU, hardware=True),
        XidInfo(154, "GPU recovery action changed", _A.IGNORE, hardware=True),
    )
}

# nvmlDeviceGpuRecoveryAction_t → action; the driver's own verdict outranks the XID table.
_RECOVERY: dict[int, XidAction] = {
    0: XidAction.IGNORE,  # NONE
    1: XidAction.RESET_GPU,  # GPU_RESET
    2: XidAction.REBOOT,  # NODE_REBOOT
    3: XidAction.DRAIN,  # DRAIN_P2P
    4: XidAction.DRAIN,  # DRAIN_AND_RESET: drain first, the reset follows
    5: XidAction.RESET_GPU,  # RECOVER_IMEX_DOMAIN
    6: XidAction.RESET_GPU,  # BUS_RESET
    7: XidAction.REBOOT,  # SYSTEM_REBOOT
}


def describe(xid: int) -> XidInfo:
    """The catalog entry for `xid`, or an `known=False` entry recommending a job restart."""
    found = _CATALOG.get(xid)
    if found is not None:
        return found
    return XidInfo(xid, f"XID {xid} (not in catalog)", XidAction.RESTART_JOB, hardware=False, known=False)


def recommended_action(xid: int) -> XidAction:
    """NVIDIA's recommended action for one XID, in trainwarden's terms."""
    return describe(xid).action


def action_for_recovery(code: int) -> XidAction:
    """The action for an NVML GPU recovery-action value (`trainwarden_gpu_recovery_action`)."""
    return _RECOVERY.get(code, XidAction.RESET_GPU)


def strongest(actions: list[XidAction]) -> XidAction:
    """The strongest of several actions (IGNORE when none)."""
    return max(actions, key=lambda a: a.rank, default=XidAction.IGNORE)


def catalog() -> dict[int, XidInfo]:
    """A copy of the whole catalog (for docs and `trainwarden status`)."""
    return dict(_CATALOG)
