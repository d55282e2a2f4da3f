"""deploy/kubernetes/ manifests, checked for structure (no Kubernetes API server runs here).

What can be checked without a cluster is checked against the real code: the container args
parse with trainwarden's own command line, the ConfigMap's config.toml loads with the real
config loader, every path the config names is mounted, and the probes hit the port served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from trainwarden.config import load_config_text
from trainwarden.daemon.cli import build_parser
from trainwarden.plugins import plugin_groups
from trainwarden.protocol import SOCKET_ENV, SOCKET_NAME

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def documents(name: str) -> list[dict[str, Any]]:
    """Every YAML document of one manifest file."""
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of `kind`."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's volume mounts by mount path."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def shipped_config() -> Any:
    """The ConfigMap's config.toml, loaded by the real loader."""
    configmap = one(documents("daemonset.yaml"), "ConfigMap")
    return load_config_text(configmap["data"]["config.toml"], plugin_groups(), "ConfigMap trainwarden-config")


@pytest.mark.parametrize("name", ["daemonset.yaml", "training-pod.yaml"])
def test_every_mount_has_its_volume(name: str) -> None:
    """Each volumeMount names a volume the pod defines, and no volume is left unused."""
    docs = documents(name)
    spec = (
        one(docs, "DaemonSet")["spec"]["template"]["spec"]
        if name == "daemonset.yaml"
        else one(docs, "Pod")["spec"]
    )
    volumes = {v["name"] for v in spec["volumes"]}
    used = {m["name"] for c in spec["containers"] + spec.get("initContainers", []) for m in c["volumeMounts"]}
    assert used == volumes


def test_daemonset_runs_the_daemon_read_only_with_probes_on_healthz() -> None:
    """The daemon container: its args parse, read-only root, both probes on /healthz at its port."""
    daemonset = one(documents("daemonset.yaml"), "DaemonSet")
    assert daemonset["apiVersion"] == "apps/v1"
    template = daemonset["spec"]["template"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.func.__name__ == "run_daemon"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(shipped_config().daemon.listen.rsplit(":", 1)[1])
    assert port["http"] == listen_port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    # On the host's network, so the preflight init container's --daemon-url (the node IP) reaches it.
    assert template["spec"]["hostNetwork"] is True
    (init,) = one(documents("training-pod.yaml"), "Pod")["spec"]["initContainers"]
    url = build_parser().parse_args(init["args"]).daemon_url
    assert url == f"http://$(NODE_IP):{listen_port}"
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in init["env"]


def test_every_path_the_config_reads_or_writes_is_mounted() -> None:
    """procfs, sysfs, kmsg, state, runtime and every disk_usage volume are mounted; writable ones rw."""
    config = shipped_config()
    (container,) = one(documents("daemonset.yaml"), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    mounted = mounts(container)
    assert str(config.paths.procfs) in mounted
    assert str(config.paths.sysfs) in mounted
    assert str(config.paths.devfs / "kmsg") in mounted
    for path in config.plugin("collectors", "disk_usage").volumes.values():
        assert str(path) in mounted, path
    for writable in (config.daemon.state_dir, config.daemon.runtime_dir):
        assert not mounted[str(writable)].get("readOnly", False)
    assert mounted[str(config.paths.procfs)]["readOnly"] is True


def test_init_container_runs_the_preflight_on_the_same_paths() -> None:
    """The training pod's init container parses as `trainwarden preflight` and mounts what it checks."""
    pod = one(documents("training-pod.yaml"), "Pod")
    (init,) = pod["spec"]["initContainers"]
    args = build_parser().parse_args(init["args"])
    assert args.func.__name__ == "run_preflight_command"
    mounted = mounts(init)
    config = shipped_config()
    assert args.checkpoint_dir is not None
    for path in (config.paths.procfs, config.paths.sysfs, config.daemon.state_dir, args.checkpoint_dir):
        assert str(path) in mounted, path
    assert not mounted[str(args.checkpoint_dir)].get("readOnly", False)  # the write probe


def test_training_container_finds_the_daemon_socket_and_probes_with_preflight() -> None:
    """The training container's socket is in the daemon's runtime dir; its readiness probe is a preflight."""
    pod = one(documents("training-pod.yaml"), "Pod")
    (train,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in train["env"]}
    runtime = shipped_config().daemon.runtime_dir
    assert env[SOCKET_ENV] == str(runtime / SOCKET_NAME)
    assert str(runtime) in mounts(train)
    command = train["readinessProbe"]["exec"]["command"]
    assert command[0] == "trainwarden"
    assert build_parser().parse_args(command[1:]).func.__name__ == "run_preflight_command"
