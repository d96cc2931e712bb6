"""What a Cluster's kubeconfig may contain: only what reaching a remote API server needs.

A kubeconfig is a program as much as a file: the client library's loader runs ``exec``
credential plugins and ``auth-provider`` helpers, and reads ``tokenFile``,
``client-certificate``, ``client-key`` and ``certificate-authority`` from the local disk.
Applied through the API, each of those would run a command or read a file on the
controller. So a kubeconfig is parsed here into plain fields (server, inline CA, bearer
token, inline client certificate and key, TLS server name) and anything else is refused
with the path of the field; the Kubernetes driver builds its client from these fields
alone and never hands the document to the library's loader."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import yaml
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

MAX_KUBECONFIG_BYTES = 256 * 1024

# Fields that make the client library run a command or read the controller's disk.
_REFUSED = {
    "exec": "a credential plugin would run a command on the controller",
    "auth-provider": "an auth provider would run a helper on the controller",
    "tokenFile": "it would read a file on the controller (give token)",
    "client-certificate": "it would read a file on the controller (give client-certificate-data)",
    "client-key": "it would read a file on the controller (give client-key-data)",
    "certificate-authority": "it would read a file on the controller "
    "(give certificate-authority-data)",
    "username": "basic authentication is not supported (give a token or a client certificate)",
    "password": "basic authentication is not supported (give a token or a client certificate)",
    "proxy-url": "it would send the controller's traffic through another host",
    "as": "impersonation is not supported",
    "as-groups": "impersonation is not supported",
    "as-uid": "impersonation is not supported",
    "as-user-extra": "impersonation is not supported",
}
_USER_FIELDS = {"token", "client-certificate-data", "client-key-data"}
_CLUSTER_FIELDS = {
    "server",
    "certificate-authority-data",
    "insecure-skip-tls-verify",
    "tls-server-name",
}
_TOP_FIELDS = {"apiVersion", "kind", "clusters", "users", "contexts", "current-context"}
# Harmless metadata kubectl writes; accepted and ignored.
_IGNORED = {"preferences", "extensions"}


@dataclass(frozen=True)
class RemoteAccess:
    """Everything the driver needs of a kubeconfig, and nothing else."""

    server: str
    ca_pem: str | None = None
    token: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    tls_server_name: str | None = None
    insecure_skip_tls_verify: bool = False
    namespace: str | None = None


class KubeconfigRefused(ValueError):
    pass


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KubeconfigRefused(f"{where}: expected a mapping")
    return value


def _check_fields(item: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in item:
        if key in _IGNORED:
            continue
        if key in _REFUSED:
            raise KubeconfigRefused(f"{where}.{key}: not accepted: {_REFUSED[key]}")
        if key not in allowed:
            raise KubeconfigRefused(
                f"{where}.{key}: unknown field (accepted: {', '.join(sorted(allowed))})"
            )


def _pem(value: Any, where: str) -> str:
    """A *-data field: base64 of PEM, as kubectl writes it."""
    if not isinstance(value, str):
        raise KubeconfigRefused(f"{where}: expected base64-encoded PEM")
    try:
        text = base64.b64decode(value.encode(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise KubeconfigRefused(f"{where}: not base64-encoded PEM") from exc
    if "-----BEGIN " not in text:
        raise KubeconfigRefused(f"{where}: the decoded value is not PEM")
    return text


def _named(doc: dict[str, Any], section: str, name: str | None, body: str) -> dict[str, Any]:
    items = doc.get(section) or []
    if not isinstance(items, list):
        raise KubeconfigRefused(f"{section}: expected a list")
    for i, item in enumerate(items):
        item = _mapping(item, f"{section}[{i}]")
        _check_fields(item, {"name", body}, f"{section}[{i}]")
    if name is None and len(items) == 1:
        return _mapping(items[0].get(body), f"{section}[0].{body}")
    for i, item in enumerate(items):
        if item.get("name") == name:
            return _mapping(item.get(body), f"{section}[{i}].{body}")
    raise KubeconfigRefused(f"{section}: no entry named {name!r}")


def parse_kubeconfig(text: str) -> RemoteAccess:
    """The kubeconfig's current context as plain fields; raises KubeconfigRefused naming
    the offending field. Every entry is checked, not only the current context's."""
    if len(text.encode()) > MAX_KUBECONFIG_BYTES:
        raise KubeconfigRefused(f"larger than {MAX_KUBECONFIG_BYTES // 1024} KiB")
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        # Where, not what: the parser's message quotes the document, which holds secrets.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KubeconfigRefused(f"not valid YAML{where}") from None
    doc = _mapping(doc, "kubeconfig")
    _check_fields(doc, _TOP_FIELDS, "kubeconfig")
    for section, body, allowed in (
        ("users", "user", _USER_FIELDS),
        ("clusters", "cluster", _CLUSTER_FIELDS),
        ("contexts", "context", {"cluster", "user", "namespace"}),
    ):
        items = doc.get(section) or []
        if not isinstance(items, list):
            raise KubeconfigRefused(f"{section}: expected a list")
        for i, item in enumerate(items):
            entry = _mapping(_mapping(item, f"{section}[{i}]").get(body), f"{section}[{i}].{body}")
            _check_fields(entry, allowed, f"{section}[{i}].{body}")
    contexts = doc.get("contexts") or []
    current = doc.get("current-context")
    if contexts:
        ctx = _named(doc, "contexts", current, "context")
        cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    elif current is not None:
        raise KubeconfigRefused(f"current-context {current!r}: there are no contexts")
    else:
        cluster_name = user_name = None
        ctx = {}
    cluster = _named(doc, "clusters", cluster_name, "cluster")
    user = _named(doc, "users", user_name, "user") if doc.get("users") else {}
    server = cluster.get("server")
    if not isinstance(server, str):
        raise KubeconfigRefused("clusters[].cluster.server: expected an https:// URL")
    try:
        server = canonical_server(server)
    except KubeconfigRefused as exc:
        raise KubeconfigRefused(f"clusters[].cluster.{exc}") from None
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise KubeconfigRefused("clusters[].cluster.insecure-skip-tls-verify: expected a boolean")
    token = user.get("token")
    if token is not None and not isinstance(token, str):
        raise KubeconfigRefused("users[].user.token: expected a string")
    cert = user.get("client-certificate-data")
    key = user.get("client-key-data")
    if (cert is None) != (key is None):
        raise KubeconfigRefused(
            "users[].user: client-certificate-data and client-key-data go together"
        )
    if token is None and cert is None:
        raise KubeconfigRefused("users[].user: give token or client-certificate-data/-key-data")
    ca = cluster.get("certificate-authority-data")
    name = cluster.get("tls-server-name")
    namespace = ctx.get("namespace")
    return RemoteAccess(
        server=server,
        ca_pem=_pem(ca, "clusters[].cluster.certificate-authority-data") if ca else None,
        token=token,
        client_cert_pem=_pem(cert, "users[].user.client-certificate-data") if cert else None,
        client_key_pem=_pem(key, "users[].user.client-key-data") if key else None,
        tls_server_name=str(name) if name else None,
        insecure_skip_tls_verify=insecure,
        namespace=str(namespace) if namespace else None,
    )


# A path prefix (a cluster behind a proxy such as Rancher's) in plain characters only.
_SAFE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)*")


def canonical_server(url: str) -> str:
    """``scheme://host[:port][/path]`` of an API server URL, parsed by urllib3 (the parser the
    Kubernetes client connects with, so a check of the host is a check of where it
    connects). Anything that could make two parsers disagree, or send the request
    elsewhere, is refused: user info, a query, a fragment, backslashes, spaces, odd paths."""
    if any(c in url for c in "\\@ \t\r\n") or not url.isascii():
        raise KubeconfigRefused(
            f"server {url!r}: expected scheme://host[:port] (no user info, spaces or backslashes)"
        )
    try:
        parsed = parse_url(url)
    except LocationParseError as exc:
        raise KubeconfigRefused(f"server {url!r}: not a URL") from exc
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise KubeconfigRefused(f"server {url!r}: expected https://host[:port]")
    path = (parsed.path or "").rstrip("/")
    if parsed.auth or parsed.query or parsed.fragment or not _SAFE_PATH.fullmatch(path):
        raise KubeconfigRefused(
            f"server {url!r}: expected https://host[:port][/path], without a query or fragment"
        )
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host.lower()}{port}{path}"


def server_allowed(server: str, allowlist: list[str]) -> bool:
    """Whether an API server URL's host is on the allow-list: a hostname must match a
    host entry (exact, or ``*.suffix``); an IP address must fall in a network entry (CIDR)
    or equal a host entry. Hostnames are not resolved to match networks: the address at
    apply time says nothing of the one the driver will connect to later."""
    try:
        host = (parse_url(canonical_server(server)).host or "").strip("[]").rstrip(".")
    except KubeconfigRefused:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowlist:
        entry = entry.strip().lower()
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address in network:
                return True
        elif entry.startswith("*."):
            if address is None and host.endswith(entry[1:]):
                return True
        elif host == entry.rstrip("."):
            return True
    return False
