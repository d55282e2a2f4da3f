"""Drain (or undrain) a Kubernetes node: cordon plus a taint, through the API server with `requests`.

Drain sets `spec.unschedulable` and adds a `NoSchedule` taint (key configurable) in one JSON merge
patch that carries the node's `resourceVersion`, so a concurrent change makes the server answer 409
and we re-read instead of overwriting someone's taints (a merge patch replaces the whole list).
Annotations record that trainwarden did it and why; undrain removes only our taint, and uncordons
only when the cordon was ours. A node cordoned by someone else is left alone. The budget counts
nodes carrying our taint across the cluster. Pods are not evicted: the taint and cordon keep new
work off, and the job's own restart moves it (an eviction is a cluster policy decision).

Auth: in-cluster service account (token and CA under /var/run/secrets/kubernetes.io/serviceaccount,
server from KUBERNETES_SERVICE_HOST/PORT) or explicit `api_server`, `token_file`, `ca_file` and an
optional client certificate, as a kubeconfig would give them. The RBAC the account needs:
`get`, `list`, `patch` on `nodes`. Tested against a local server that checks the requests, not
against a real cluster.

    [healers.k8s_drain]
    enabled = true
    max_drained_nodes = 2
    taint_key = "trainwarden.io/unhealthy"
    taint_effect = "NoSchedule"
    # api_server = "https://10.0.0.1:6443"   # default: in-cluster service account
    # node = "gpu-07"                          # default: $NODE_NAME, else the hostname
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import requests

from trainwarden.commands import sanitize_reason
from trainwarden.config import PluginOptions
from trainwarden.errors import TrainwardenError
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext
from trainwarden.model import MetricKind, MetricSpec, Sample

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ANNOTATION_PREFIX = "trainwarden.io/"
DRAINED = ANNOTATION_PREFIX + "drained"
CORDONED = ANNOTATION_PREFIX + "cordoned"
REASON = ANNOTATION_PREFIX + "drain-reason"
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_RETRIES = 3

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
NODE_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
"""A Kubernetes node name (DNS subdomain, lower case)."""
_QUALIFIED_NAME = re.compile(
    rf"^(?:(?=.{{1,253}}/){_DNS_LABEL}(?:\.{_DNS_LABEL})*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
)

K8S_REQUESTS = MetricSpec(
    "trainwarden_k8s_requests_total",
    "Kubernetes API requests of the k8s_drain healer by verb and result (2xx, 4xx, 5xx, error, refused).",
    MetricKind.COUNTER,
    ("verb", "result"),
)


class KubernetesError(TrainwardenError):
    """The API server could not be reached or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class K8sDrainOptions(PluginOptions):
    """How to reach the API server and what to mark drained nodes with."""

    enabled: bool = False  # draining takes capacity away: only when the config asks for it

    api_server: str = ""  # empty: in-cluster (KUBERNETES_SERVICE_HOST/PORT)
    token_file: Path = SERVICE_ACCOUNT / "token"
    ca_file: Path = SERVICE_ACCOUNT / "ca.crt"
    client_cert_file: str = ""
    client_key_file: str = ""
    insecure_skip_tls_verify: bool = False
    timeout_seconds: float = 10.0
    taint_key: str = "trainwarden.io/unhealthy"
    taint_effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"
    max_drained_nodes: int = 1
    node: str = ""  # default: $NODE_NAME (downward API), else the hostname

    def problems(self) -> list[tuple[str, str]]:
        """Valid URL scheme, taint key, node name, budget and timeout."""
        found = super().problems()
        if self.api_server and not self.api_server.startswith(("https://", "http://")):
            found.append(("api_server", "must start with https:// (or http:// for a local proxy)"))
        if not _QUALIFIED_NAME.match(self.taint_key):
            found.append(("taint_key", "must be a qualified name such as 'example.com/unhealthy'"))
        if self.node and not NODE_NAME.match(self.node):
            found.append(("node", f"must match {NODE_NAME.pattern}"))
        if self.max_drained_nodes < 0:
            found.append(("max_drained_nodes", "must be >= 0"))
        if self.timeout_seconds <= 0:
            found.append(("timeout_seconds", "must be > 0"))
        if bool(self.client_cert_file) != bool(self.client_key_file):
            missing = "client_key_file" if self.client_cert_file else "client_cert_file"
            found.append((missing, "client_cert_file and client_key_file go together"))
        return found


def _status_message(response: requests.Response) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:300]
    return response.text[:200]


class KubeClient:
    """The three node calls the healer makes; a new token is read for every request (they rotate)."""

    def __init__(self, options: K8sDrainOptions, environ: Mapping[str, str] | None = None) -> None:
        self.options = options
        env = os.environ if environ is None else environ
        server = options.api_server
        if not server:
            host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise KubernetesError(
                    "no api_server configured and not in a cluster (KUBERNETES_SERVICE_HOST unset)"
                )
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.server = server.rstrip("/")
        self.session = requests.Session()
        # Passed with every request: a Session's own `verify` loses to REQUESTS_CA_BUNDLE in the
        # environment, which would make the cluster CA silently ignored.
        self.verify: bool | str = True
        if options.insecure_skip_tls_verify:
            self.verify = False
        elif options.ca_file.is_file():
            self.verify = str(options.ca_file)
        self.cert = (options.client_cert_file, options.client_key_file) if options.client_cert_file else None
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def count(self, verb: str, result: str) -> None:
        """Count one request (or refusal) by verb and result class."""
        with self._lock:
            self.counts[(verb, result)] = self.counts.get((verb, result), 0) + 1

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        try:
            token = self.options.token_file.read_text(encoding="utf-8").strip()
        except OSError:
            token = ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(self, verb: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One API call; JSON result, or `KubernetesError` carrying the HTTP status."""
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = MERGE_PATCH
            data = json.dumps(body)
        try:
            response = self.session.request(
                verb,
                self.server + path,
                headers=headers,
                data=data,
                timeout=self.options.timeout_seconds,
                verify=self.verify,
                cert=self.cert,
            )
        except requests.RequestException as exc:
            self.count(verb, "error")
            raise KubernetesError(f"{verb} {path}: {type(exc).__name__}: {exc}") from exc
        self.count(verb, f"{response.status_code // 100}xx")
        if response.status_code >= 300:
            message = _status_message(response)
            raise KubernetesError(
                f"{verb} {path}: HTTP {response.status_code}: {message}", response.status_code
            )
        try:
            return response.json()
        except ValueError as exc:
            raise KubernetesError(f"{verb} {path}: answer is not JSON") from exc

    def get_node(self, name: str) -> dict[str, Any] | None:
        """The Node object, or None when it does not exist."""
        try:
            node = self.request("GET", f"/api/v1/nodes/{quote(name, safe='')}")
        except KubernetesError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(node, dict):
            raise KubernetesError(f"GET node {name}: expected an object")
        return node

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every node, following `continue` tokens page by page."""
        nodes: list[dict[str, Any]] = []
        token = ""
        for _page in range(1000):
            path = "/api/v1/nodes?limit=500" + (f"&continue={quote(token, safe='')}" if token else "")
            page = self.request("GET", path)
            items = page.get("items") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise KubernetesError("GET nodes: answer has no items list")
            nodes.extend(item for item in items if isinstance(item, dict))
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                return nodes
        raise KubernetesError("GET nodes: more than 1000 pages")

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """JSON merge patch of one node."""
        node = self.request("PATCH", f"/api/v1/nodes/{quote(name, safe='')}", patch)
        if not isinstance(node, dict):
            raise KubernetesError(f"PATCH node {name}: expected an object")
        return node


def _taints(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    taints = (node.get("spec") or {}).get("taints") or []
    return [t for t in taints if isinstance(t, dict)]


def _annotations(node: Mapping[str, Any]) -> Mapping[str, Any]:
    return (node.get("metadata") or {}).get("annotations") or {}


def _unschedulable(node: Mapping[str, Any]) -> bool:
    return bool((node.get("spec") or {}).get("unschedulable", False))


class K8sDrainHealer(Healer):
    """Cordon and taint one Kubernetes node, or undo exactly what trainwarden did."""

    name = "k8s_drain"
    Options = K8sDrainOptions

    def __init__(
        self, options: PluginOptions, context: HealerContext, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(options, context)
        assert isinstance(options, K8sDrainOptions)
        self.opts = options
        self._environ = os.environ if environ is None else environ
        self._client: KubeClient | None = None
        self._refused = 0

    @property
    def client(self) -> KubeClient:
        """Built lazily, so a daemon outside a cluster fails an action, not its start."""
        if self._client is None:
            self._client = KubeClient(self.opts, self._environ)
        return self._client

    def samples(self) -> list[Sample]:
        """`trainwarden_k8s_requests_total{verb,result}` for the exporter."""
        counts = dict(self._client.counts) if self._client else {}
        if self._refused:
            counts[("PATCH", "refused")] = self._refused
        return [
            K8S_REQUESTS.sample(n, verb=verb, result=result) for (verb, result), n in sorted(counts.items())
        ]

    def target(self, action: Action) -> str:
        """The node an action is about."""
        node = action.subject.get("node") or str(action.params.get("node", "")) or self.opts.node
        return node or self._environ.get("NODE_NAME", "") or socket.gethostname()

    def _ours(self, node: Mapping[str, Any]) -> bool:
        return any(t.get("key") == self.opts.taint_key for t in _taints(node))

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:
        """Drain or undrain the action's node; never raises."""
        name = self.target(action)
        operation = str(action.params.get("operation", "drain"))
        if not NODE_NAME.match(name):
            self._refused += 1
            why = f"refused: node name {name[:80]!r} must match {NODE_NAME.pattern}"
            return ActionResult(ActionOutcome.FAILED, why, {"refused": "bad_input"})
        if operation not in ("drain", "undrain"):
            self._refused += 1
            why = f"refused: params.operation {operation[:40]!r} must be 'drain' or 'undrain'"
            return ActionResult(ActionOutcome.FAILED, why, {"refused": "bad_input"})
        try:
            for _attempt in range(CONFLICT_RETRIES):
                try:
                    if operation == "drain":
                        return self._drain(name, action.reason, dry_run=dry_run)
                    return self._undrain(name, dry_run=dry_run)
                except KubernetesError as exc:
                    if exc.status != 409:
                        raise
            return ActionResult(
                ActionOutcome.FAILED, f"node {name} kept changing under us (409 x{CONFLICT_RETRIES})"
            )
        except KubernetesError as exc:
            return ActionResult(ActionOutcome.FAILED, str(exc), {"node": name})

    def _drain(self, name: str, reason: str, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per state
        node = self.client.get_node(name)
        if node is None:
            return ActionResult(ActionOutcome.FAILED, f"node {name} does not exist", {"node": name})
        if self._ours(node):
            return ActionResult(
                ActionOutcome.NOOP, f"node {name} already drained by trainwarden", {"node": name}
            )
        if _unschedulable(node):
            detail = f"node {name} already cordoned by someone else; left alone"
            return ActionResult(ActionOutcome.NOOP, detail, {"node": name, "foreign": True})
        others = sorted(
            str((n.get("metadata") or {}).get("name", "?"))
            for n in self.client.list_nodes()
            if self._ours(n) and (n.get("metadata") or {}).get("name") != name
        )
        if len(others) >= self.opts.max_drained_nodes:
            detail = (
                f"refused: budget of {self.opts.max_drained_nodes} drained node(s) reached "
                f"({len(others)} drained by trainwarden: {', '.join(others[:10]) or 'none'}); "
                f"{name} not drained"
            )
            return ActionResult(ActionOutcome.FAILED, detail, {"node": name, "refused": "budget"})
        text = sanitize_reason(reason or "unhealthy")
        if dry_run:
            return ActionResult(
                ActionOutcome.DRY_RUN, f"would cordon and taint {name}: {text!r}", {"node": name}
            )
        taint = {"key": self.opts.taint_key, "value": "true", "effect": self.opts.taint_effect}
        patch = {
            "metadata": {
                "resourceVersion": (node.get("metadata") or {}).get("resourceVersion"),
                "annotations": {DRAINED: "true", CORDONED: "true", REASON: text},
            },
            "spec": {"unschedulable": True, "taints": [*_taints(node), taint]},
        }
        after = self.client.patch_node(name, patch)
        if not (_unschedulable(after) and self._ours(after)):
            return ActionResult(ActionOutcome.FAILED, f"cordon/taint of {name} did not stick", {"node": name})
        return ActionResult(
            ActionOutcome.APPLIED, f"cordoned and tainted {name} ({self.opts.taint_key})", {"node": name}
        )

    def _undrain(self, name: str, *, dry_run: bool) -> ActionResult:
        node = self.client.get_node(name)
        if node is None:
            return ActionResult(ActionOutcome.FAILED, f"node {name} does not exist", {"node": name})
        if not self._ours(node):
            if _unschedulable(node):
                detail = f"refused: node {name} was cordoned by someone else; not uncordoned"
                return ActionResult(ActionOutcome.FAILED, detail, {"node": name, "refused": "foreign_drain"})
            return ActionResult(
                ActionOutcome.NOOP, f"node {name} is not drained by trainwarden", {"node": name}
            )
        if dry_run:
            return ActionResult(
                ActionOutcome.DRY_RUN, f"would remove our taint from {name} and uncordon it", {"node": name}
            )
        we_cordoned = _annotations(node).get(CORDONED) == "true"
        spec: dict[str, Any] = {"taints": [t for t in _taints(node) if t.get("key") != self.opts.taint_key]}
        if we_cordoned:
            spec["unschedulable"] = False
        patch = {
            "metadata": {
                "resourceVersion": (node.get("metadata") or {}).get("resourceVersion"),
                "annotations": {DRAINED: None, CORDONED: None, REASON: None},
            },
            "spec": spec,
        }
        after = self.client.patch_node(name, patch)
        if self._ours(after) or (we_cordoned and _unschedulable(after)):
            return ActionResult(ActionOutcome.FAILED, f"undrain of {name} did not stick", {"node": name})
        return ActionResult(
            ActionOutcome.APPLIED, f"removed our taint from {name} and uncordoned it", {"node": name}
        )


HEALER = K8sDrainHealer
