"""What each shipped dashboard shows, as plain data: rows of panels, each with its PromQL.

`generate.py` turns these into Grafana JSON with grafana-foundation-sdk; `queries.py` hands the
same queries to tests that run them against a real Prometheus. Kept free of the SDK so that
reading the queries needs nothing beyond the standard library.

Label conventions (see prometheus/README.md): `job` is the training job, `node` is set by the
scrape config, `gpu` is the NVML index. Template variables are `$node`, `$gpu` and `$job`
(multi-value, "All" = `.*`); rates use Grafana's `$__rate_interval`.

`requires` names what must be true for a panel to have data, so a test knows what to set up:

- `gpu`: the NVML collector runs (a GPU, or `TRAINWARDEN_NVML_FIXTURE`);
- `infiniband`: the node has InfiniBand/RoCE ports;
- `checkpoints_volume`: `[collectors.disk_usage.volumes] checkpoints = "..."` is configured;
- `training`: a training rank reports to the daemon;
- `recording_rules`: Prometheus evaluates prometheus/recording.rules.yml;
- `two_checkpoints`: the job saved at least twice (so its interval is known);
- `finding`: a node-local rule is firing, or was during the time range;
- `refusal`: the policy refused at least one finding since the daemon started.

Not shown, because the daemon does not export them yet: goodput (issue 12) and the actions left
in the policy's budget window (refusals for `budget` are shown instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and how its series are named in the legend."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A time series (or single-stat) panel."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    requires: frozenset[str] = frozenset()
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A multi-value template variable filled from label values (`$name` in queries)."""

    name: str
    label: str
    query: str


@dataclass(frozen=True)
class Dashboard:
    """One dashboard: identity, template variables (in order) and rows."""

    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("trainwarden",))


# The Prometheus data source is a variable too (`${datasource}`), added to every dashboard.
NODE_VAR = Variable("node", "Node", 'label_values(up{job="trainwarden"}, node)')
GPU_VAR = Variable("gpu", "GPU", 'label_values(trainwarden_gpu_up{node=~"$node"}, gpu)')
JOB_VAR = Variable("job", "Training job", "label_values(trainwarden_train_step, job)")
JOB_NODE_VAR = Variable("node", "Node", 'label_values(trainwarden_train_step{job=~"$job"}, node)')

N = 'node=~"$node"'
NG = 'node=~"$node", gpu=~"$gpu"'
JN = 'job=~"$job", node=~"$node"'
GPU = frozenset({"gpu"})
IB = frozenset({"infiniband"})
TRAINING = frozenset({"training"})
RULES = frozenset({"training", "recording_rules"})


def _gpu(title: str, description: str, unit: str, *queries: Query, width: int = 8) -> Panel:
    return Panel(title, description, unit, queries, GPU, width=width)


NODE = Dashboard(
    uid="trainwarden-node",
    title="trainwarden / Node",
    description="One or more training nodes: daemon, GPUs, host, pressure, disks (checkpoint volume "
    "first), InfiniBand.",
    variables=(NODE_VAR, GPU_VAR),
    rows=(
        Row(
            "Daemon",
            (
                Panel(
                    "Daemon up",
                    "1 while Prometheus can scrape the node's daemon (TrainwardenDaemonDown).",
                    "none",
                    (Query(f'up{{job="trainwarden", {N}}}', "{{node}}"),),
                    width=8,
                ),
                Panel(
                    "Collector success",
                    "1 if the collector's last run succeeded (TrainwardenCollectorFailing).",
                    "none",
                    (Query(f"trainwarden_collector_success{{{N}}}", "{{node}} {{collector}}"),),
                    width=8,
                ),
                Panel(
                    "Collector duration",
                    "Wall time of each collector's last run; a hung run shows its timeout.",
                    "s",
                    (Query(f"trainwarden_collector_duration_seconds{{{N}}}", "{{node}} {{collector}}"),),
                    width=8,
                ),
            ),
        ),
        Row(
            "GPUs",
            (
                _gpu(
                    "GPU up",
                    "1 while NVML answers for the GPU; 0 once it fell off the bus (TrainwardenGpuLost).",
                    "none",
                    Query(f"trainwarden_gpu_up{{{NG}}}", "{{node}} gpu {{gpu}}"),
                ),
                _gpu(
                    "GPU utilization",
                    "Fraction of the sample period a kernel ran.",
                    "percentunit",
                    Query(f"trainwarden_gpu_utilization_ratio{{{NG}}}", "{{node}} gpu {{gpu}}"),
                ),
                _gpu(
                    "GPU memory used",
                    "Framebuffer memory in use, as a fraction of its size.",
                    "percentunit",
                    Query(
                        f"trainwarden_gpu_memory_used_bytes{{{NG}}}"
                        f" / trainwarden_gpu_memory_total_bytes{{{NG}}}",
                        "{{node}} gpu {{gpu}}",
                    ),
                ),
                _gpu(
                    "GPU temperature",
                    "Die and HBM temperature.",
                    "celsius",
                    Query(f"trainwarden_gpu_temperature_celsius{{{NG}}}", "{{node}} gpu {{gpu}} {{sensor}}"),
                ),
                _gpu(
                    "GPU power",
                    "Board power draw.",
                    "watt",
                    Query(f"trainwarden_gpu_power_watts{{{NG}}}", "{{node}} gpu {{gpu}}"),
                ),
                _gpu(
                    "SM clock",
                    "Current SM clock; a drop without idle means throttling.",
                    "hertz",
                    Query(f'trainwarden_gpu_clock_hertz{{{NG}, clock="sm"}}', "{{node}} gpu {{gpu}}"),
                ),
                _gpu(
                    "Clock event reasons",
                    "GPUs whose clocks each reason holds down (TrainwardenGpuClocksThrottled: thermal and "
                    "power-brake reasons; sw_power_cap is normal under load).",
                    "none",
                    Query(
                        f"sum by (node, reason) (trainwarden_gpu_clock_event_reason_active{{{NG}}})",
                        "{{node}} {{reason}}",
                    ),
                ),
                _gpu(
                    "ECC errors",
                    "New volatile ECC errors by type (TrainwardenGpuUncorrectableEcc: uncorrected).",
                    "short",
                    Query(
                        "sum by (node, gpu, type) (increase(trainwarden_gpu_ecc_errors_total"
                        f'{{{NG}, counter="volatile"}}[$__rate_interval]))',
                        "{{node}} gpu {{gpu}} {{type}}",
                    ),
                ),
                _gpu(
                    "Row remapping",
                    "1 while a remap waits for a GPU reset, or a row could not be remapped "
                    "(service the GPU).",
                    "none",
                    Query(f"trainwarden_gpu_row_remap_pending{{{NG}}}", "{{node}} gpu {{gpu}} pending"),
                    Query(f"trainwarden_gpu_row_remap_failure{{{NG}}}", "{{node}} gpu {{gpu}} failure"),
                ),
                _gpu(
                    "XIDs by recommended action",
                    "New XID incidents by NVIDIA's recommended action (TrainwardenGpuXid*Recommended).",
                    "short",
                    Query(
                        "sum by (node, gpu, action) (increase(trainwarden_gpu_xid_actions_total"
                        f"{{{NG}}}[$__rate_interval]))",
                        "{{node}} gpu {{gpu}} {{action}}",
                    ),
                ),
                _gpu(
                    "PCIe replays and NVLink errors",
                    "Link-level retransmissions and NVLink errors per second.",
                    "short",
                    Query(
                        "sum by (node, gpu) (rate(trainwarden_gpu_pcie_replays_total"
                        f"{{{NG}}}[$__rate_interval]))",
                        "{{node}} gpu {{gpu}} pcie replays",
                    ),
                    Query(
                        "sum by (node, gpu, type) (rate(trainwarden_gpu_nvlink_errors_total"
                        f"{{{NG}}}[$__rate_interval]))",
                        "{{node}} gpu {{gpu}} nvlink {{type}}",
                    ),
                ),
            ),
        ),
        Row(
            "Host",
            (
                Panel(
                    "CPU busy",
                    "Fraction of CPU time not idle or waiting for IO.",
                    "percentunit",
                    (
                        Query(
                            "1 - sum by (node) (rate(trainwarden_host_cpu_seconds_total"
                            f'{{{N}, mode=~"idle|iowait"}}[$__rate_interval]))'
                            " / sum by (node) (rate(trainwarden_host_cpu_seconds_total"
                            f"{{{N}}}[$__rate_interval]))",
                            "{{node}}",
                        ),
                    ),
                    width=8,
                ),
                Panel(
                    "Memory available",
                    "Memory available to new allocations, as a fraction of the total.",
                    "percentunit",
                    (
                        Query(
                            f"trainwarden_host_memory_available_bytes{{{N}}}"
                            f" / trainwarden_host_memory_total_bytes{{{N}}}",
                            "{{node}}",
                        ),
                    ),
                    width=8,
                ),
                Panel(
                    "Network traffic",
                    "Bytes per second received and sent, by interface.",
                    "Bps",
                    (
                        Query(
                            f"rate(trainwarden_host_network_receive_bytes_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}} rx",
                        ),
                        Query(
                            f"rate(trainwarden_host_network_transmit_bytes_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}} tx",
                        ),
                    ),
                    width=8,
                ),
            ),
        ),
        Row(
            "Pressure",
            (
                Panel(
                    "Pressure stall: some",
                    "Share of time at least one task stalled on CPU, memory or IO (PSI).",
                    "percentunit",
                    (
                        Query(
                            f'trainwarden_host_pressure_stall_ratio{{{N}, kind="some"}}',
                            "{{node}} {{resource}}",
                        ),
                    ),
                ),
                Panel(
                    "Pressure stall: full",
                    "Share of time all non-idle tasks stalled on memory or IO at once (PSI).",
                    "percentunit",
                    (
                        Query(
                            f'trainwarden_host_pressure_stall_ratio{{{N}, kind="full"}}',
                            "{{node}} {{resource}}",
                        ),
                    ),
                ),
            ),
        ),
        Row(
            "Disks",
            (
                Panel(
                    "Checkpoint volume available",
                    "Bytes the training job can still write to the checkpoint volume "
                    "(TrainwardenCheckpointVolumeFilling).",
                    "bytes",
                    (
                        Query(
                            f'trainwarden_host_filesystem_avail_bytes{{{N}, volume="checkpoints"}}',
                            "{{node}}",
                        ),
                    ),
                    frozenset({"checkpoints_volume"}),
                    width=8,
                ),
                Panel(
                    "Checkpoint volume trend",
                    "Change of the checkpoint volume's available bytes per second over the last hour "
                    "(negative: filling).",
                    "Bps",
                    (
                        Query(
                            "deriv(trainwarden_host_filesystem_avail_bytes"
                            f'{{{N}, volume="checkpoints"}}[1h])',
                            "{{node}}",
                        ),
                    ),
                    frozenset({"checkpoints_volume"}),
                    width=8,
                ),
                Panel(
                    "Volumes used",
                    "Used fraction of every watched volume.",
                    "percentunit",
                    (
                        Query(
                            f"1 - trainwarden_host_filesystem_avail_bytes{{{N}}}"
                            f" / trainwarden_host_filesystem_size_bytes{{{N}}}",
                            "{{node}} {{volume}}",
                        ),
                    ),
                    width=8,
                ),
                Panel(
                    "Inodes free",
                    "Free inodes of every watched volume (sharded checkpoints can run out of inodes first).",
                    "percentunit",
                    (
                        Query(
                            f"trainwarden_host_filesystem_files_free{{{N}}}"
                            f" / trainwarden_host_filesystem_files{{{N}}}",
                            "{{node}} {{volume}}",
                        ),
                    ),
                ),
                Panel(
                    "Disk busy",
                    "Fraction of time each block device had IO in flight.",
                    "percentunit",
                    (
                        Query(
                            f"rate(trainwarden_host_disk_io_time_seconds_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}",
                        ),
                    ),
                ),
            ),
        ),
        Row(
            "InfiniBand",
            (
                Panel(
                    "Port up",
                    "1 when the port is active and its link up.",
                    "none",
                    (Query(f"trainwarden_infiniband_port_up{{{N}}}", "{{node}} {{device}}/{{port}}"),),
                    IB,
                    width=8,
                ),
                Panel(
                    "Port traffic",
                    "Bytes per second sent and received per port.",
                    "Bps",
                    (
                        Query(
                            f"rate(trainwarden_infiniband_port_transmitted_bytes_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} tx",
                        ),
                        Query(
                            f"rate(trainwarden_infiniband_port_received_bytes_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} rx",
                        ),
                    ),
                    IB,
                    width=8,
                ),
                Panel(
                    "Port errors and congestion",
                    "Symbol errors, link downs and receive errors per second; transmit wait (credits) "
                    "per second.",
                    "short",
                    (
                        Query(
                            f"rate(trainwarden_infiniband_port_symbol_errors_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} symbol errors",
                        ),
                        Query(
                            f"rate(trainwarden_infiniband_port_link_downed_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} link downed",
                        ),
                        Query(
                            f"rate(trainwarden_infiniband_port_receive_errors_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} receive errors",
                        ),
                        Query(
                            f"rate(trainwarden_infiniband_port_transmit_wait_total{{{N}}}[$__rate_interval])",
                            "{{node}} {{device}}/{{port}} transmit wait",
                        ),
                    ),
                    IB,
                    width=8,
                ),
            ),
        ),
    ),
)

TRAINING_JOB = Dashboard(
    uid="trainwarden-training",
    title="trainwarden / Training job",
    description="One training job across its nodes: loss, grad-norm, lr, step time per rank with stragglers, "
    "phases, checkpoints, restarts, and goodput (where every second of the job went, docs/GOODPUT.md).",
    variables=(JOB_VAR, JOB_NODE_VAR),
    rows=(
        Row(
            "Goodput",
            (
                Panel(
                    "Goodput",
                    "Productive seconds over every second the node's daemon accounted for the job, since "
                    "it was first seen (docs/GOODPUT.md).",
                    "percentunit",
                    (Query(f"trainwarden_goodput_ratio{{{JN}}}", "{{node}}"),),
                    TRAINING,
                    width=6,
                ),
                Panel(
                    "Goodput, last 10 minutes",
                    "The same ratio over a sliding 10-minute window, all nodes together (recording rule).",
                    "percentunit",
                    (Query('job:trainwarden_goodput_seconds:ratio_rate10m{job=~"$job"}', "{{job}}"),),
                    RULES | {"steady_steps"},
                    width=6,
                ),
                Panel(
                    "Where the time goes",
                    "Seconds per second in each state (productive, repeated, restarting, detecting, "
                    "checkpointing, initialising, evaluating), summed over the job's nodes.",
                    "none",
                    (
                        Query(
                            f"sum by (job, state) (rate(trainwarden_goodput_seconds_total{{{JN}}}"
                            "[$__rate_interval]))",
                            "{{state}}",
                        ),
                    ),
                    TRAINING,
                    width=6,
                ),
                Panel(
                    "Steps repeated, last hour",
                    "Steps redone after a resume (restarts by cause: trainwarden_goodput_restarts_total, "
                    "exported once the job has restarted).",
                    "none",
                    (
                        Query(
                            f"sum by (job) (increase(trainwarden_goodput_steps_repeated_total{{{JN}}}[1h]))",
                            "steps repeated",
                        ),
                    ),
                    TRAINING,
                    width=6,
                ),
            ),
        ),
        Row(
            "Progress",
            (
                Panel(
                    "Loss",
                    "Last reported loss per rank; a gap is NaN/Inf (TrainwardenLossNonFinite).",
                    "none",
                    (Query(f"trainwarden_train_loss{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Gradient norm",
                    "Pre-clip gradient norm per rank; spikes precede NaNs.",
                    "none",
                    (Query(f"trainwarden_train_grad_norm{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Learning rate",
                    "Last reported learning rate.",
                    "none",
                    (Query(f"trainwarden_train_learning_rate{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Step",
                    "Last reported step per rank.",
                    "none",
                    (Query(f"trainwarden_train_step{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Tokens per second",
                    "Tokens of the last step divided by its duration, summed over the job's ranks.",
                    "short",
                    (Query(f"sum by (job) (trainwarden_train_tokens_per_second{{{JN}}})", "{{job}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Time since last step",
                    "Seconds since each rank's last step (TrainwardenJobStalled when every rank is flat).",
                    "s",
                    (
                        Query(
                            f"time() - trainwarden_train_last_step_timestamp_seconds{{{JN}}}",
                            "{{node}} rank {{rank}}",
                        ),
                    ),
                    TRAINING,
                    width=8,
                ),
            ),
        ),
        Row(
            "Step time and stragglers",
            (
                Panel(
                    "Step time per rank",
                    "Duration of each rank's last step.",
                    "s",
                    (Query(f"trainwarden_train_step_seconds{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Node step time vs the job's median",
                    "Each node's median step time divided by the job's median node; a straggler node sits "
                    "above 1.2 (TrainwardenStragglerNode).",
                    "none",
                    (
                        Query(
                            f"job_node:trainwarden_train_step_seconds:ratio_to_job_p50{{{JN}}}",
                            "{{node}}",
                        ),
                    ),
                    RULES,
                    width=8,
                ),
                Panel(
                    "Job step time",
                    "Median and 99th percentile over every rank of the job, and each node's median.",
                    "s",
                    (
                        Query('job:trainwarden_train_step_duration_seconds:p50{job=~"$job"}', "p50"),
                        Query('job:trainwarden_train_step_duration_seconds:p99{job=~"$job"}', "p99"),
                        Query(f"job_node:trainwarden_train_step_seconds:p50{{{JN}}}", "{{node}} median"),
                    ),
                    RULES,
                    width=8,
                ),
            ),
        ),
        Row(
            "Phases",
            (
                Panel(
                    "Ranks per phase",
                    "How many ranks are in each phase (step, checkpoint, eval, data, init).",
                    "none",
                    (Query(f"sum by (job, phase) (trainwarden_train_phase{{{JN}}})", "{{phase}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Phase durations",
                    "Duration of the last completed non-step phase per rank.",
                    "s",
                    (Query(f"trainwarden_train_phase_seconds{{{JN}}}", "{{node}} rank {{rank}} {{phase}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Oldest collective in flight",
                    "Age of the oldest collective begun and not ended per rank (0 if none).",
                    "s",
                    (
                        Query(
                            f"trainwarden_train_collective_in_flight_seconds{{{JN}}}",
                            "{{node}} rank {{rank}}",
                        ),
                    ),
                    TRAINING,
                    width=8,
                ),
            ),
        ),
        Row(
            "Checkpoints and restarts",
            (
                Panel(
                    "Checkpoint age",
                    "Seconds since the job's newest checkpoint (TrainwardenCheckpointStale).",
                    "s",
                    (
                        Query(
                            "time() - max by (job) (trainwarden_train_last_checkpoint_timestamp_seconds"
                            '{job=~"$job"})',
                            "{{job}}",
                        ),
                    ),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Checkpoint interval",
                    "The gap between the job's last two checkpoints, as Prometheus saw them.",
                    "s",
                    (
                        Query(
                            "last_over_time(job:trainwarden_train_checkpoint_interval_seconds:observed"
                            '{job=~"$job"}[1d])',
                            "{{job}}",
                        ),
                    ),
                    RULES | {"two_checkpoints"},
                    width=8,
                ),
                Panel(
                    "Launcher restarts",
                    "Restarts of the job as its launcher counts them (TrainwardenRestartStorm).",
                    "none",
                    (Query(f"max by (job) (trainwarden_train_launcher_restarts{{{JN}}})", "{{job}}"),),
                    TRAINING,
                    width=8,
                ),
                Panel(
                    "Last checkpoint step",
                    "Step of the last checkpoint each rank reported.",
                    "none",
                    (Query(f"trainwarden_train_last_checkpoint_step{{{JN}}}", "{{node}} rank {{rank}}"),),
                    TRAINING,
                ),
                Panel(
                    "Client records dropped",
                    "Records the training client dropped per second (daemon absent or slow).",
                    "short",
                    (
                        Query(
                            f"rate(trainwarden_client_records_dropped_total{{{JN}}}[$__rate_interval])",
                            "{{node}} rank {{rank}}",
                        ),
                    ),
                    TRAINING,
                ),
            ),
        ),
    ),
)

HEALING = Dashboard(
    uid="trainwarden-healing",
    title="trainwarden / Healing",
    description="What the daemons found and did: findings, actions by healer and outcome, refusals, "
    "breakers. "
    "Each action carried out wrote an incident bundle under the state directory.",
    variables=(NODE_VAR,),
    rows=(
        Row(
            "Findings",
            (
                Panel(
                    "Actions enabled",
                    "1 where the policy may act; 0 is observe-only (dry run), the default.",
                    "none",
                    (Query(f"trainwarden_policy_actions_enabled{{{N}}}", "{{node}}"),),
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Findings fired by rule",
                    "Findings that went from pending to firing.",
                    "short",
                    (
                        Query(
                            "sum by (node, rule) (increase(trainwarden_rule_findings_fired_total"
                            f"{{{N}}}[$__rate_interval]))",
                            "{{node}} {{rule}}",
                        ),
                    ),
                    width=9,
                ),
                Panel(
                    "Active findings",
                    "1 while a finding fires; a line ends when the finding resolves.",
                    "none",
                    (Query(f"trainwarden_rule_active{{{N}}}", "{{node}} {{rule}} {{subject}}"),),
                    frozenset({"finding"}),
                    width=9,
                ),
            ),
        ),
        Row(
            "Actions",
            (
                Panel(
                    "Actions by healer and result",
                    "Policy decisions per healer: applied, noop, dry_run, failed, refused, gave_up, alerted.",
                    "short",
                    (
                        Query(
                            "sum by (node, healer, result) (increase(trainwarden_actions_total"
                            f"{{{N}}}[$__rate_interval]))",
                            "{{node}} {{healer}} {{result}}",
                        ),
                    ),
                ),
                Panel(
                    "Incidents (actions carried out)",
                    "Actions applied, found already done, or failed; each wrote an incident bundle.",
                    "short",
                    (
                        Query(
                            "sum by (node, healer) (increase(trainwarden_actions_total"
                            f'{{{N}, result=~"applied|noop|failed"}}[$__rate_interval]))',
                            "{{node}} {{healer}}",
                        ),
                    ),
                ),
                Panel(
                    "Refusals by reason",
                    "Findings not acted on: cooldown, budget (the window's budget is spent), circuit_open, "
                    "healer_disabled, gave_up, no_route.",
                    "short",
                    (
                        Query(
                            "sum by (node, reason) (increase(trainwarden_policy_refusals_total"
                            f"{{{N}}}[$__rate_interval]))",
                            "{{node}} {{reason}}",
                        ),
                    ),
                    frozenset({"refusal"}),
                    width=8,
                ),
                Panel(
                    "Circuit breakers open",
                    "1 while a healer is switched off after consecutive failures "
                    "(TrainwardenHealerCircuitOpen).",
                    "none",
                    (Query(f"trainwarden_policy_breaker_open{{{N}}}", "{{node}} {{healer}}"),),
                    width=8,
                ),
                Panel(
                    "Rule and journal errors",
                    "Rule evaluations that raised, and journal reads or writes that failed.",
                    "short",
                    (
                        Query(
                            "sum by (node, rule) (increase(trainwarden_rule_errors_total"
                            f"{{{N}}}[$__rate_interval]))",
                            "{{node}} {{rule}}",
                        ),
                        Query(
                            f"increase(trainwarden_journal_errors_total{{{N}}}[$__rate_interval])",
                            "{{node}} journal",
                        ),
                    ),
                    width=8,
                ),
            ),
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (NODE, TRAINING_JOB, HEALING)
