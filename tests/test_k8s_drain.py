"""The Kubernetes drain healer against a local HTTP(S) server that checks the exact API requests.

No real API server can run here: `FakeApiServer` serves Node objects, applies JSON merge patches
(RFC 7386) with resourceVersion conflicts (409) as the API server does, pages node lists with
`continue` tokens, and records every request so tests check method, path, headers and body.
"""

from __future__ import annotations

import copy
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.k8s_drain import CORDONED, DRAINED, REASON, K8sDrainHealer, K8sDrainOptions

TOKEN = "test-token-1"
OUR_TAINT = "trainwarden.io/unhealthy"
FOREIGN_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def make_node(
    name: str, *, unschedulable: bool = False, taints: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"podCIDR": "10.0.0.0/24"}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = taints
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": "100", "labels": {"kubernetes.io/hostname": name}},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeApiServer:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    page_size: int = 2
    status_override: int | None = None
    concurrent_change: dict[str, Any] | None = None  # merged into the node just before the next PATCH
    token: str = TOKEN
    rv: int = 100
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        decoded = json.loads(body) if body else None
        with self.lock:
            self.requests.append(Recorded(method, parts.path, parse_qs(parts.query), headers, decoded))
            if headers.get("authorization") != f"Bearer {self.token}":
                return 401, status_body(401, "Unauthorized")
            if self.status_override:
                return self.status_override, status_body(self.status_override, 'nodes "x" is forbidden: RBAC')
            if parts.path == "/api/v1/nodes" and method == "GET":
                return 200, self.list_page(parse_qs(parts.query))
            prefix = "/api/v1/nodes/"
            if not parts.path.startswith(prefix):
                return 404, status_body(404, "no such path")
            name = parts.path.removeprefix(prefix)
            if name not in self.nodes:
                return 404, status_body(404, f'nodes "{name}" not found')
            if method == "GET":
                return 200, self.nodes[name]
            if method == "PATCH":
                return self.patch(name, headers, decoded)
        return 405, status_body(405, "method not allowed")

    def list_page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        names = sorted(self.nodes)
        start = int(query.get("continue", ["0"])[0])
        page = names[start : start + self.page_size]
        more = start + self.page_size < len(names)
        return {
            "kind": "NodeList",
            "metadata": {
                "resourceVersion": str(self.rv),
                **({"continue": str(start + self.page_size)} if more else {}),
            },
            "items": [self.nodes[n] for n in page],
        }

    def patch(self, name: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        content_type = headers.get("content-type", "")
        if content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return 415, status_body(415, f"unsupported patch type {content_type!r}")
        if self.concurrent_change is not None:
            self.nodes[name] = merge_patch(self.nodes[name], self.concurrent_change)
            self.bump(name)
            self.concurrent_change = None
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        current = self.nodes[name]["metadata"]["resourceVersion"]
        if wanted is not None and wanted != current:
            msg = f'Operation cannot be fulfilled on nodes "{name}": the object has been modified'
            return 409, status_body(409, msg)
        patched = merge_patch(self.nodes[name], body)
        patched["metadata"]["resourceVersion"] = current
        self.nodes[name] = patched
        self.bump(name)
        return 200, self.nodes[name]

    def bump(self, name: str) -> None:
        self.rv += 1
        self.nodes[name]["metadata"]["resourceVersion"] = str(self.rv)


def status_body(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


def serve(api: FakeApiServer, tls: tuple[Path, Path] | None = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, answer = api.handle(self.command, self.path, headers, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_PUT = do_POST = _any  # noqa: N815 - http.server's naming

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    api.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    fake.nodes = {
        "gpu-1": make_node("gpu-1", taints=[dict(FOREIGN_TAINT)]),
        "gpu-2": make_node("gpu-2"),
        "gpu-3": make_node("gpu-3"),
        "cpu-1": make_node("cpu-1"),
        "cpu-2": make_node("cpu-2"),
    }
    server = serve(fake)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def healer(api: FakeApiServer, token_file: Path, **overrides: Any) -> K8sDrainHealer:
    options = K8sDrainOptions(enabled=True, api_server=api.url, token_file=token_file, **overrides)
    return K8sDrainHealer(options, HealerContext(), environ={})


def drain(node: str, reason: str = "xid 79 on gpu 3") -> Action:
    return Action("k8s_drain", f"drain-{node}", reason, subject={"node": node})


def undrain(node: str) -> Action:
    return Action(
        "k8s_drain", f"undrain-{node}", "healthy", subject={"node": node}, params={"operation": "undrain"}
    )


def our_taints(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in node["spec"].get("taints", []) if t["key"] == OUR_TAINT]


def test_drain_sends_one_exact_merge_patch(api: FakeApiServer, token_file: Path) -> None:
    """Drain sends one merge PATCH: bearer token, resourceVersion, cordon, and both taints."""
    result = healer(api, token_file).apply(drain("gpu-1", 'bad "gpu"\nnow'), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    (patch,) = api.patches()
    assert patch.path == "/api/v1/nodes/gpu-1"
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.headers["authorization"] == f"Bearer {TOKEN}"
    assert patch.body == {
        "metadata": {
            "resourceVersion": "100",
            "annotations": {DRAINED: "true", CORDONED: "true", REASON: "bad _gpu_ now"},
        },
        "spec": {
            "unschedulable": True,
            "taints": [FOREIGN_TAINT, {"key": OUR_TAINT, "value": "true", "effect": "NoSchedule"}],
        },
    }
    node = api.nodes["gpu-1"]
    assert node["spec"]["unschedulable"] is True
    assert node["spec"]["taints"][0] == FOREIGN_TAINT


def test_drain_twice_is_noop(api: FakeApiServer, token_file: Path) -> None:
    """A node already carrying our taint is not patched again."""
    h = healer(api, token_file)
    assert h.apply(drain("gpu-2"), dry_run=False).outcome is ActionOutcome.APPLIED
    again = h.apply(drain("gpu-2"), dry_run=False)
    assert again.outcome is ActionOutcome.NOOP
    assert len(api.patches()) == 1
    assert len(our_taints(api.nodes["gpu-2"])) == 1


def test_node_cordoned_by_someone_else_is_left_alone(api: FakeApiServer, token_file: Path) -> None:
    """A node an admin cordoned is neither tainted by drain nor uncordoned by undrain."""
    api.nodes["gpu-3"] = make_node("gpu-3", unschedulable=True)
    h = healer(api, token_file)
    drained = h.apply(drain("gpu-3"), dry_run=False)
    assert drained.outcome is ActionOutcome.NOOP
    assert "someone else" in drained.detail
    refused = h.apply(undrain("gpu-3"), dry_run=False)
    assert refused.outcome is ActionOutcome.FAILED
    assert refused.data["refused"] == "foreign_drain"
    assert api.patches() == []
    assert api.nodes["gpu-3"]["spec"]["unschedulable"] is True


def test_undrain_removes_only_what_we_added(api: FakeApiServer, token_file: Path) -> None:
    """Undrain drops our taint and annotations and uncordons, keeping the foreign taint."""
    h = healer(api, token_file)
    assert h.apply(drain("gpu-1"), dry_run=False).outcome is ActionOutcome.APPLIED
    result = h.apply(undrain("gpu-1"), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    patch = api.patches()[-1]
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.body["spec"] == {"taints": [FOREIGN_TAINT], "unschedulable": False}
    assert patch.body["metadata"]["annotations"] == {DRAINED: None, CORDONED: None, REASON: None}
    node = api.nodes["gpu-1"]
    assert node["spec"]["taints"] == [FOREIGN_TAINT]
    assert node["spec"]["unschedulable"] is False
    assert DRAINED not in node["metadata"].get("annotations", {})
    assert h.apply(undrain("gpu-1"), dry_run=False).outcome is ActionOutcome.NOOP


def test_budget_counts_tainted_nodes_across_pages(api: FakeApiServer, token_file: Path) -> None:
    """With a budget of 1 and another node (on a later list page) already drained, the drain is refused."""
    api.nodes["gpu-3"] = make_node(
        "gpu-3", unschedulable=True, taints=[{"key": OUR_TAINT, "effect": "NoSchedule"}]
    )
    result = healer(api, token_file, max_drained_nodes=1).apply(drain("cpu-1"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "budget"
    assert "gpu-3" in result.detail
    lists = [r for r in api.requests if r.path == "/api/v1/nodes"]
    assert len(lists) == 3  # 5 nodes, 2 per page
    assert lists[1].query["continue"] == ["2"]
    assert api.patches() == []


def test_dry_run_patches_nothing(api: FakeApiServer, token_file: Path) -> None:
    """A dry run reads state and reports, but sends no PATCH."""
    result = healer(api, token_file).apply(drain("gpu-2"), dry_run=True)
    assert result.outcome is ActionOutcome.DRY_RUN
    assert api.patches() == []
    assert "unschedulable" not in api.nodes["gpu-2"]["spec"]


def test_conflict_rereads_and_keeps_concurrent_taint(api: FakeApiServer, token_file: Path) -> None:
    """On 409 (node changed meanwhile) the healer re-reads, so a taint added concurrently is not lost."""
    other = {"key": "example.com/maintenance", "effect": "NoSchedule"}
    api.concurrent_change = {"spec": {"taints": [other]}}
    result = healer(api, token_file).apply(drain("gpu-2"), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert len(api.patches()) == 2
    keys = [t["key"] for t in api.nodes["gpu-2"]["spec"]["taints"]]
    assert keys == ["example.com/maintenance", OUR_TAINT]


def test_api_errors_are_failed_results_with_the_server_message(api: FakeApiServer, token_file: Path) -> None:
    """A 403 or an unknown node becomes a FAILED result that quotes the API server, never an exception."""
    h = healer(api, token_file)
    missing = h.apply(drain("gpu-9"), dry_run=False)
    assert missing.outcome is ActionOutcome.FAILED
    assert "gpu-9 does not exist" in missing.detail
    api.status_override = 403
    forbidden = h.apply(drain("gpu-2"), dry_run=False)
    assert forbidden.outcome is ActionOutcome.FAILED
    assert "HTTP 403" in forbidden.detail
    assert "forbidden: RBAC" in forbidden.detail
    counts = {dict(s.labels)["result"]: s.value for s in h.samples() if dict(s.labels)["verb"] == "GET"}
    assert counts["4xx"] == 2


def test_bad_node_name_is_refused_and_counted(api: FakeApiServer, token_file: Path) -> None:
    """A node name that is not a DNS subdomain never reaches the API and is counted as refused."""
    h = healer(api, token_file)
    result = h.apply(drain("../../api/v1/namespaces"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "bad_input"
    assert api.requests == []
    assert [(dict(s.labels), s.value) for s in h.samples()] == [({"result": "refused", "verb": "PATCH"}, 1.0)]


def test_not_in_cluster_fails_the_action_not_the_daemon(token_file: Path) -> None:
    """Without api_server and outside a cluster the action fails with a clear message."""
    h = K8sDrainHealer(K8sDrainOptions(enabled=True, token_file=token_file), HealerContext(), environ={})
    result = h.apply(drain("gpu-1"), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "KUBERNETES_SERVICE_HOST" in result.detail


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed; cannot make a test certificate")
    cert, key = tmp_path / "ca.crt", tmp_path / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kubernetes",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_in_cluster_https_with_service_account_ca_and_rotating_token(
    tls_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """In-cluster settings (env host/port, CA, token file) work over TLS; a rotated token is used."""
    fake = FakeApiServer(nodes={"gpu-1": make_node("gpu-1")})
    server = serve(fake, tls=tls_pair)
    try:
        token = tmp_path / "sa-token"
        token.write_text(TOKEN)
        port = fake.url.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        options = K8sDrainOptions(enabled=True, token_file=token, ca_file=tls_pair[0])
        h = K8sDrainHealer(options, HealerContext(), environ=env)
        assert h.apply(drain("gpu-1"), dry_run=True).outcome is ActionOutcome.DRY_RUN
        fake.token = "rotated-token-2"
        token.write_text("rotated-token-2")
        result = h.apply(drain("gpu-1"), dry_run=False)
        assert result.outcome is ActionOutcome.APPLIED, result.detail
        assert fake.requests[-1].headers["authorization"] == "Bearer rotated-token-2"
    finally:
        server.shutdown()
        server.server_close()


def test_tls_without_the_right_ca_is_refused(
    tls_pair: tuple[Path, Path], tmp_path: Path, token_file: Path
) -> None:
    """A server whose certificate the configured CA does not sign is not trusted."""
    fake = FakeApiServer(nodes={"gpu-1": make_node("gpu-1")})
    server = serve(fake, tls=tls_pair)
    try:
        options = K8sDrainOptions(
            enabled=True, api_server=fake.url, token_file=token_file, ca_file=tmp_path / "none"
        )
        result = K8sDrainHealer(options, HealerContext(), environ={}).apply(drain("gpu-1"), dry_run=False)
        assert result.outcome is ActionOutcome.FAILED
        assert "SSLError" in result.detail
        assert fake.requests == []
    finally:
        server.shutdown()
        server.server_close()
