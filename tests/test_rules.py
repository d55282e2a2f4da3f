"""Each rule on synthetic store windows: it fires on the fault and stays quiet on healthy, jittery data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training_series import COLL_DURATION, IN_FLIGHT, LOSS, PROCESS_UP, TrainingFeed, steady
from trainwarden.config import ConfigError, config_from_dict, load_config_text
from trainwarden.model import Finding, MetricKind, MetricSpec
from trainwarden.rules import rule_classes
from trainwarden.rules import threshold as threshold_module
from trainwarden.rules.base import RuleView, quantile, robust_z
from trainwarden.rules.collective import CollectiveOptions, CollectiveStuckRule, histogram_quantile
from trainwarden.rules.gpu_health import GpuHealthRule
from trainwarden.rules.nonfinite import NonFiniteRule
from trainwarden.rules.process_gone import ProcessGoneRule
from trainwarden.rules.spike import SpikeRule
from trainwarden.rules.stall import StallOptions, StallRule
from trainwarden.rules.straggler import StragglerRule
from trainwarden.rules.threshold import ThresholdCheck, ThresholdOptions, ThresholdRule
from trainwarden.rules.throughput import ThroughputDropRule
from trainwarden.store import Store
from trainwarden.xid_catalog import XidAction, catalog


@pytest.fixture
def store() -> Store:
    return Store(window_seconds=3600)


@pytest.fixture
def feed(store: Store) -> TrainingFeed:
    return TrainingFeed(store)


def view(store: Store) -> RuleView:
    return RuleView(store)


# --- statistics -----------------------------------------------------------------------------


def test_quantile_matches_linear_interpolation() -> None:
    """The quantile helper interpolates like numpy's default method."""
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([5.0], 0.99) == 5.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_robust_z_ignores_one_outlier_in_baseline() -> None:
    """Median/MAD stay put when the baseline already holds an outlier."""
    z, center, _ = robust_z(1.2, [1.0, 1.1, 0.9, 1.0, 1000.0], min_scale=1e-9)
    assert center == 1.0
    assert z > 1


def test_histogram_quantile_interpolates_inside_bucket() -> None:
    """A quantile from cumulative buckets interpolates within its bucket, as Prometheus does."""
    buckets = [(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.55)


# --- stall -----------------------------------------------------------------------------------


def test_stall_fires_after_learned_timeout(store: Store, feed: TrainingFeed) -> None:
    """A rank silent for longer than quantile x factor of its own step times is stalled; the other is not."""
    last = steady(feed, ranks=2, start=0.0, count=40, seconds=1.0)
    feed.step(0, last + 1.0, 1.0)
    rule = StallRule(StallOptions(floor_seconds=2.0, safety_factor=4.0))
    assert rule.evaluate(view(store), last + 3.0) == []
    found = rule.evaluate(view(store), last + 4.8)
    assert [f.subject["rank"] for f in found] == ["1"]
    evidence = found[0].evidence
    assert evidence["timeout_source"] == "learned"
    assert 4.0 <= float(evidence["timeout_seconds"]) <= 5.0
    assert evidence["phase"] == "step"


def test_stall_uses_generous_default_before_learning(store: Store, feed: TrainingFeed) -> None:
    """With too few steps to learn from, the default timeout applies instead of a tiny learned one."""
    steady(feed, ranks=1, start=0.0, count=3, seconds=1.0)
    rule = StallRule(StallOptions(default_timeout_seconds=120.0))
    assert rule.evaluate(view(store), 100.0) == []
    found = rule.evaluate(view(store), 130.0)
    assert found[0].evidence["timeout_source"] == "default"


def test_stall_not_fooled_by_long_checkpoint(store: Store, feed: TrainingFeed) -> None:
    """A checkpoint phase far longer than a step is judged by the checkpoint bound, and the step after it
    is timed from the checkpoint's end, not from the last step before it."""
    last = steady(feed, ranks=1, start=0.0, count=40, seconds=1.0)
    rule = StallRule(StallOptions(floor_seconds=2.0))
    feed.phase(0, "checkpoint", last + 0.5)
    assert rule.evaluate(view(store), last + 300.0) == []  # 5 min into a checkpoint: still fine
    feed.phase(0, "step", last + 400.0, finished=("checkpoint", 399.5))
    assert rule.evaluate(view(store), last + 402.0) == []
    found = rule.evaluate(view(store), last + 410.0)
    assert found
    assert found[0].evidence["phase"] == "step"
    assert float(found[0].evidence["timeout_seconds"]) < 10


def test_stall_learns_checkpoint_bound(store: Store, feed: TrainingFeed) -> None:
    """After several checkpoints the checkpoint bound is learned and a checkpoint far beyond it is a hang."""
    t = steady(feed, ranks=1, start=0.0, count=30, seconds=1.0)
    for _ in range(3):
        feed.phase(0, "checkpoint", t)
        t += 20.0
        feed.phase(0, "step", t, finished=("checkpoint", 20.0))
        t = steady(feed, ranks=1, start=t, count=5, seconds=1.0)
    feed.phase(0, "checkpoint", t)
    rule = StallRule(StallOptions(floor_seconds=2.0, phase_floor_seconds=10.0))
    assert rule.evaluate(view(store), t + 60.0) == []
    found = rule.evaluate(view(store), t + 100.0)
    assert found[0].evidence["phase"] == "checkpoint"
    assert found[0].evidence["timeout_source"] == "learned"


def test_stall_quiet_on_healthy_jittery_job(store: Store, feed: TrainingFeed) -> None:
    """A job stepping with +-6% jitter never stalls, at any tick between steps."""
    rule = StallRule(StallOptions(floor_seconds=2.0))
    for i in range(60):
        steady(feed, ranks=2, start=float(i), count=1, seconds=1.0)
        assert rule.evaluate(view(store), i + 1.9) == []


def test_stall_leaves_dead_process_to_process_gone(store: Store, feed: TrainingFeed) -> None:
    """A rank whose process vanished is reported by process_gone only."""
    last = steady(feed, ranks=1, start=0.0, count=30)
    feed.set(PROCESS_UP, 0, last + 1, job="toy", rank="0")
    assert StallRule(StallOptions(floor_seconds=2.0)).evaluate(view(store), last + 500) == []
    found = ProcessGoneRule(ProcessGoneRule.Options()).evaluate(view(store), last + 500)
    assert [f.subject for f in found] == [{"job": "toy", "rank": "0"}]
    assert found[0].evidence["pid"] == 1000
    assert found[0].evidence["observed_at"] == last  # its last step: when it was last seen working


# --- collective ------------------------------------------------------------------------------


def _histogram(feed: TrainingFeed, counts: dict[float, float], at: float) -> None:
    for upper, count in counts.items():
        le = "+Inf" if math.isinf(upper) else str(upper)
        sample = COLL_DURATION.sample(count, at, suffix="_bucket", job="toy", op="all_reduce", le=le)
        feed.store.add(feed.source, [sample], at)


def test_collective_stuck_learned_bound(store: Store, feed: TrainingFeed) -> None:
    """A collective open far longer than the job's learned collective bound fires; a short one does not."""
    _histogram(feed, {0.01: 90.0, 0.1: 100.0, math.inf: 100.0}, 10.0)
    rule = CollectiveStuckRule(CollectiveOptions(floor_seconds=5.0))
    feed.set(IN_FLIGHT, 3.0, 10.0, job="toy", rank="0")
    assert rule.evaluate(view(store), 10.0) == []
    found = rule.evaluate(view(store), 13.0)  # 3 s old at collection + 3 s since
    assert found[0].subject == {"job": "toy", "rank": "0"}
    assert found[0].evidence["bound_source"] == "learned"


def test_collective_ignored_during_checkpoint(store: Store, feed: TrainingFeed) -> None:
    """A long barrier inside a checkpoint phase is not a stuck collective."""
    feed.phase(0, "checkpoint", 0.0)
    feed.set(IN_FLIGHT, 1000.0, 10.0, job="toy", rank="0")
    assert CollectiveStuckRule(CollectiveOptions()).evaluate(view(store), 10.0) == []


# --- spike / non-finite ----------------------------------------------------------------------


def test_spike_fires_on_grad_norm_outlier_with_step(store: Store, feed: TrainingFeed) -> None:
    """A grad-norm 20x its median after warm-up is a spike, with the step number in the evidence."""
    last = steady(feed, ranks=2, start=0.0, count=60)
    feed.step(1, last + 1, 1.0, loss=1.9, grad_norm=20.0)
    found = SpikeRule(SpikeRule.Options()).evaluate(view(store), last + 2)
    assert len(found) == 1
    evidence = found[0].evidence
    assert (found[0].subject, evidence["metric"], evidence["rank"]) == ({"job": "toy"}, "grad_norm", "1")
    assert evidence["step"] == 61
    assert evidence["observed_at"] == last + 1  # when the spike point arrived: the policy's evidence time


def test_spike_quiet_on_jitter_and_during_warmup(store: Store, feed: TrainingFeed) -> None:
    """Jittery but healthy data never spikes, and nothing fires before the warm-up baseline exists."""
    rule = SpikeRule(SpikeRule.Options())
    last = steady(feed, ranks=2, start=0.0, count=10)
    feed.step(0, last + 1, 1.0, grad_norm=50.0)
    assert rule.evaluate(view(store), last + 2) == []  # warm-up: 10 points < 30
    store2 = Store(window_seconds=3600)
    last = steady(TrainingFeed(store2), ranks=2, start=0.0, count=300)
    for t in range(35, int(last), 7):
        assert rule.evaluate(view(store2), float(t)) == []


def test_spike_on_log_loss(store: Store, feed: TrainingFeed) -> None:
    """Loss jumping by an order of magnitude is a spike on the log scale."""
    last = steady(feed, ranks=1, start=0.0, count=60)
    feed.step(0, last + 1, 1.0, loss=40.0)
    found = SpikeRule(SpikeRule.Options()).evaluate(view(store), last + 2)
    assert found[0].evidence["metric"] == "loss"


SPIKE_SERIES = sorted((Path(__file__).parent / "fixtures" / "spike_series").glob("*.json"))


def _replay(
    series: dict[str, list[float]], scale_at: int | None = None, factor: float = 1.0
) -> list[Finding]:
    """Feed a recorded run one step per second and tick the default spike rule every 5 steps."""
    store = Store(window_seconds=3600)
    feed = TrainingFeed(store)
    rule = SpikeRule(SpikeRule.Options())
    found: list[Finding] = []
    for i, (loss, norm) in enumerate(zip(series["loss"], series["grad_norm"], strict=True)):
        jump = factor if i == scale_at else 1.0
        feed.step(0, float(i + 1), 1.0, loss=loss, grad_norm=norm * jump)
        if i % 5 == 4 or i == scale_at:
            found.extend(rule.evaluate(view(store), i + 1.5))
    return found


@pytest.mark.parametrize("path", SPIKE_SERIES, ids=lambda p: p.stem)
def test_spike_quiet_on_recorded_healthy_runs(path: Path) -> None:
    """Real fault-free runs (a small conv net under constant LR, warm-up + cosine/linear decay and step
    decay, recorded by bench/spike_false_positives.py) raise no spike with the default options."""
    series = json.loads(path.read_text(encoding="utf-8"))
    assert max(series["grad_norm"]) > 5 * series["grad_norm"][0]  # the warm-up growth that fooled it
    assert _replay(series) == []


@pytest.mark.parametrize("path", SPIKE_SERIES, ids=lambda p: p.stem)
def test_spike_caught_on_recorded_runs_with_an_injected_bad_batch(path: Path) -> None:
    """A bad batch multiplying the grad norm by 5 on a real run is caught at its step; a 2x wobble is not."""
    series = json.loads(path.read_text(encoding="utf-8"))
    found = _replay(series, scale_at=400, factor=5.0)
    assert found
    assert {(f.evidence["metric"], f.evidence["step"]) for f in found} == {("grad_norm", 401)}
    assert _replay(series, scale_at=400, factor=2.0) == []


def test_nonfinite_first_step_is_where_the_fault_began(store: Store, feed: TrainingFeed) -> None:
    """A NaN burst longer than the lookback still names its first bad step, so a late restart skips the
    batch that started it."""
    last = steady(feed, ranks=1, start=0.0, count=60)
    for i in range(1, 100):
        feed.step(0, last + i, 1.0, loss=math.nan)
    rule = NonFiniteRule(NonFiniteRule.Options(recent_seconds=10.0))
    found = rule.evaluate(view(store), last + 100)
    assert (found[0].evidence["first_step"], found[0].evidence["last_step"]) == (61, 159)
    assert found[0].evidence["observed_at"] == last + 99


def test_nonfinite_not_a_spike_and_reports_steps(store: Store, feed: TrainingFeed) -> None:
    """NaN/Inf fire nonfinite with first and last bad step, and are skipped by the spike rule."""
    last = steady(feed, ranks=2, start=0.0, count=60)
    feed.step(0, last + 1, 1.0, loss=math.nan)
    feed.step(0, last + 2, 1.0, grad_norm=math.inf)
    feed.step(1, last + 2, 1.0, grad_norm=math.inf)
    assert SpikeRule(SpikeRule.Options()).evaluate(view(store), last + 3) == []
    found = NonFiniteRule(NonFiniteRule.Options()).evaluate(view(store), last + 3)
    assert len(found) == 1
    evidence = found[0].evidence
    assert (evidence["first_step"], evidence["last_step"], evidence["count"]) == (61, 62, 3)
    assert evidence["ranks"] == "0,1"
    assert NonFiniteRule(NonFiniteRule.Options()).evaluate(view(store), last + 200) == []


# --- straggler / throughput ------------------------------------------------------------------


def test_straggler_rank_vs_node_median(store: Store, feed: TrainingFeed) -> None:
    """The one rank twice as slow as the others is a straggler; the others are not."""
    for i in range(20):
        for rank in range(4):
            feed.step(rank, float(i), 2.0 if rank == 2 else 1.0 + 0.01 * rank)
    found = StragglerRule(StragglerRule.Options()).evaluate(view(store), 20.0)
    assert [f.subject["rank"] for f in found] == ["2"]


def test_straggler_quiet_on_jitter(store: Store, feed: TrainingFeed) -> None:
    """Ranks with ordinary jitter are not stragglers."""
    steady(feed, ranks=4, start=0.0, count=40)
    assert StragglerRule(StragglerRule.Options()).evaluate(view(store), 41.0) == []


def test_throughput_drop(store: Store, feed: TrainingFeed) -> None:
    """Steps twice as slow as the job's earlier steps are a throughput drop; steady steps are not."""
    last = steady(feed, ranks=2, start=0.0, count=100, seconds=1.0)
    rule = ThroughputDropRule(ThroughputDropRule.Options())
    assert rule.evaluate(view(store), last) == []
    steady(feed, ranks=2, start=last, count=40, seconds=2.0)
    found = rule.evaluate(view(store), last + 80)
    assert found[0].subject == {"job": "toy"}
    assert float(found[0].evidence["throughput_ratio"]) == pytest.approx(0.5, abs=0.05)


# --- threshold -------------------------------------------------------------------------------

CLEAN_EXIT = MetricSpec("trainwarden_train_exited_cleanly", "bye", labelnames=("job", "rank"))
FREE = MetricSpec("trainwarden_filesystem_free_ratio", "free", labelnames=("device", "mountpoint"))


def test_threshold_subject_bounded_and_filtered(store: Store) -> None:
    """A check fires per listed subject label only, ignores other label values, and never puts paths
    in the subject."""
    store.add("fs", [FREE.sample(0.01, device="nvme0n1", mountpoint="/ckpt")], 0.0)
    store.add("fs", [FREE.sample(0.01, device="sda", mountpoint="/")], 0.0)
    check = ThresholdCheck(
        name="ckpt_full",
        metric=FREE.name,
        labels={"device": "nvme0n1"},
        op="<",
        value=0.05,
        subject_labels=("device",),
    )
    found = ThresholdRule(ThresholdOptions(checks=(check,))).evaluate(view(store), 1.0)
    assert [f.subject for f in found] == [{"check": "ckpt_full", "device": "nvme0n1"}]


def test_threshold_hysteresis_uses_clear_value(store: Store) -> None:
    """Once active, the check stays asserted until the value crosses clear_value."""
    check = ThresholdCheck(name="full", metric=FREE.name, op="<", value=0.05, clear_value=0.08)
    rule = ThresholdRule(ThresholdOptions(checks=(check,)))
    store.add("fs", [FREE.sample(0.06, device="sda", mountpoint="/")], 0.0)
    assert rule.evaluate(RuleView(store), 1.0) == []
    active = RuleView(store, active={"threshold": frozenset({"check=full"})})
    assert len(rule.evaluate(active, 1.0)) == 1
    store.add("fs", [FREE.sample(0.09, device="sda", mountpoint="/")], 2.0)
    assert rule.evaluate(RuleView(store, active={"threshold": frozenset({"check=full"})}), 2.0) == []


def test_threshold_config_rejects_unbounded_subject_and_reports_all() -> None:
    """Bad checks in TOML are all reported with their section: unbounded labels, bad op, bad name."""
    groups = {"rules": {name: cls.Options for name, cls in rule_classes().items()}}
    data = {
        "rules": {
            "threshold": {
                "checks": [
                    {"name": "x", "metric": "trainwarden_a", "subject_labels": ["mountpoint"]},
                    {"name": "Bad Name", "metric": "trainwarden_b", "op": "=~"},
                ]
            }
        }
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, groups)
    text = str(info.value)
    assert "mountpoint" in text
    assert "op" in text
    assert "Bad Name" in text
    assert "[rules.threshold]" in text


# --- gpu health ------------------------------------------------------------------------------

GPU_UP = MetricSpec("trainwarden_gpu_up", "up", labelnames=("gpu", "uuid"))
XID = MetricSpec("trainwarden_gpu_xid_errors_total", "xid", MetricKind.COUNTER, ("gpu", "xid"))


def test_gpu_lost_is_persistent(store: Store) -> None:
    """A GPU reported down becomes a critical, persistent finding on that GPU only."""
    store.replace(
        "gpu", [GPU_UP.sample(0, gpu="1", uuid="GPU-b"), GPU_UP.sample(1, gpu="0", uuid="GPU-a")], 0.0
    )
    found = GpuHealthRule(GpuHealthRule.Options()).evaluate(view(store), 1.0)
    assert [f.subject for f in found] == [{"gpu": "1"}]
    assert found[0].evidence["interruption"] == "persistent"


def test_gpu_xid_fires_on_increase_only(store: Store) -> None:
    """An XID counter fires when it increases since the previous tick, not while it stays flat."""
    rule = GpuHealthRule(GpuHealthRule.Options())
    key = (XID.name, (("gpu", "0"), ("xid", "79")))
    store.replace("xid", [XID.sample(2, gpu="0", xid="79")], 0.0)
    flat = RuleView(store, previous={key: 2.0})
    assert rule.evaluate(flat, 1.0) == []
    found = rule.evaluate(RuleView(store, previous={key: 1.0}), 1.0)
    assert found[0].subject == {"gpu": "0"}
    assert found[0].evidence["xids"] == "79"
    assert found[0].evidence["xid_increase"] == 1.0


def test_every_registered_rule_runs_on_an_empty_store(store: Store) -> None:
    """Every registered rule returns nothing (and does not raise) when no data exists yet."""
    for cls in rule_classes().values():
        assert cls(cls.Options()).evaluate(view(store), 0.0) == []


XID_WINDOWED = MetricSpec(
    "trainwarden_gpu_xid_errors_total", "xid", MetricKind.COUNTER, ("gpu", "xid"), window=True
)


def test_gpu_xid_windowed_counter_fires_then_quiets(store: Store) -> None:
    """A windowed XID counter that appears (0 -> 1) fires with the catalog's action, and stops asserting
    once it has not increased for the lookback."""
    rule = GpuHealthRule(GpuHealthRule.Options(resolve_after_seconds=30))
    for t in range(0, 100, 5):
        store.replace("xid", [XID_WINDOWED.sample(1, float(t), gpu="0", xid="79")], float(t))
        if t == 0:
            found = rule.evaluate(view(store), 0.0)
            assert found[0].evidence["xid_increase"] == 1.0
            assert found[0].evidence["action"] in {"drain", "reset_gpu", "reboot"}
            assert found[0].evidence["interruption"] == "persistent"
    assert rule.evaluate(view(store), 95.0) == []


def test_gpu_xid_ignored_action_is_quiet(store: Store) -> None:
    """XIDs the catalog says to ignore produce no finding."""
    ignored = [x for x, info in catalog().items() if info.action is XidAction.IGNORE]
    if not ignored:
        pytest.skip("catalog has no ignorable XID")
    store.replace("xid", [XID_WINDOWED.sample(3, 0.0, gpu="0", xid=str(ignored[0]))], 0.0)
    assert GpuHealthRule(GpuHealthRule.Options()).evaluate(view(store), 1.0) == []


def test_nonfinite_counts_a_re_reported_nan_once(store: Store, feed: TrainingFeed) -> None:
    """A NaN re-reported with the same timestamp (the collector re-sends latest values) counts once."""
    last = steady(feed, ranks=1, start=0.0, count=5)
    feed.step(0, last + 1, 1.0, loss=math.nan)
    feed.set(LOSS, float("nan"), last + 1, job="toy", rank="0")  # a distinct NaN object, as parsed
    found = NonFiniteRule(NonFiniteRule.Options()).evaluate(view(store), last + 2)
    assert found[0].evidence["count"] == 1


def test_process_gone_skips_clean_exit(store: Store, feed: TrainingFeed) -> None:
    """A rank that exited cleanly (said goodbye) is not reported as gone; one that vanished is."""
    steady(feed, ranks=2, start=0.0, count=3)
    for rank in ("0", "1"):
        feed.set(PROCESS_UP, 0, 4.0, job="toy", rank=rank)
    feed.set(CLEAN_EXIT, 1, 4.0, job="toy", rank="0")
    found = ProcessGoneRule(ProcessGoneRule.Options()).evaluate(view(store), 5.0)
    assert [f.subject["rank"] for f in found] == ["1"]


AVAIL = MetricSpec("trainwarden_host_filesystem_avail_bytes", "avail", labelnames=("volume",), window=True)
PRESSURE = MetricSpec(
    "trainwarden_host_pressure_stall_ratio", "psi", labelnames=("resource", "kind"), window=True
)


def _docstring_toml(module: object) -> str:
    doc = str(getattr(module, "__doc__", ""))
    block = doc.split("::\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def test_threshold_docstring_example_loads_and_fires(store: Store) -> None:
    """The documented TOML example loads and its checks fire on the series the host collectors export."""
    groups = {"rules": {name: cls.Options for name, cls in rule_classes().items()}}
    config = load_config_text(_docstring_toml(threshold_module), groups)
    options = config.plugin("rules", "threshold")
    assert isinstance(options, ThresholdOptions)
    assert [c.name for c in options.checks] == ["checkpoint_disk_low", "io_pressure_high"]
    store.replace(
        "disk", [AVAIL.sample(10e9, volume="checkpoints"), AVAIL.sample(1.0, volume="scratch")], 0.0
    )
    store.replace("psi", [PRESSURE.sample(0.7, resource="io", kind="full")], 0.0)
    found = ThresholdRule(options).evaluate(view(store), 1.0)
    assert sorted(f.subject_key for f in found) == [
        "check=checkpoint_disk_low,volume=checkpoints",
        "check=io_pressure_high",
    ]
    rule = ThresholdRule(options)
    assert rule.for_seconds(found[0]) in {120.0, 60.0}
