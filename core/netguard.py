"""The SSRF guard for webhook callbacks: which URLs the service may call, and at which address.

A ``callback_url`` must be ``http`` or ``https``, carry no credentials, and every address its host
resolves to must be public (``is_global``). Private, loopback, link-local, multicast and reserved
targets are refused unless a network in ``Settings.webhook_allow`` contains them. The check runs at
submission (a clear 422) and again at every delivery, and the delivery connects to the very
address that was checked (the Host header and TLS SNI keep the name), so DNS rebinding between the
check and the request cannot redirect it. Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

MAX_URL_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallbackUrlError(ValueError):
    """A callback URL that is malformed (``code`` invalid_callback_url) or refused (callback_url_refused)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where a delivery connects: the URL with the checked address in place of the host name."""

    url: str
    host_header: str
    sni_hostname: str | None


def parse_allowlist(entries: Iterable[str]) -> list[IPNetwork]:
    """``["127.0.0.1/32", "10.0.0.0/8"]`` -> networks; raises ValueError naming a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"NUCSEG_WEBHOOK_ALLOW entry {entry!r} is not a CIDR network: {exc}") from exc
    return networks


def check_url(url: str, allow: Iterable[str]) -> Target:
    """Validate ``url`` and resolve it to an allowed address; raises ``CallbackUrlError``."""
    parts = _parse(url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _allowed_address(parts.hostname, port, parse_allowlist(allow), url)
    netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.port:
        netloc += f":{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc
    sni = parts.hostname if parts.scheme == "https" and not _is_ip(parts.hostname) else None
    return Target(pinned, host_header, sni)


def _parse(url: str) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise CallbackUrlError("invalid_callback_url",
                               f"callback_url is {len(url)} characters, over the limit of {MAX_URL_LENGTH}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise CallbackUrlError("invalid_callback_url", f"callback_url {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise CallbackUrlError("invalid_callback_url",
                               f"callback_url {url!r} must use http or https, not {parts.scheme or '(none)'!r}")
    if not parts.hostname:
        raise CallbackUrlError("invalid_callback_url", f"callback_url {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackUrlError("invalid_callback_url",
                               f"callback_url for host {parts.hostname!r} must not carry credentials")
    if parts.fragment:
        raise CallbackUrlError("invalid_callback_url", f"callback_url {url!r} must not have a #fragment")
    return parts


def _allowed_address(host: str, port: int, allow: list[IPNetwork], url: str) -> IPAddress:
    """The first resolved address; every address must be public or allowlisted."""
    addresses = _resolve(host, port, url)
    for address in addresses:
        if not _permitted(address, allow):
            raise CallbackUrlError(
                "callback_url_refused",
                f"callback_url {url!r} resolves to {address}, a private, loopback, link-local or reserved "
                "address; only public addresses (or networks in NUCSEG_WEBHOOK_ALLOW) may be called")
    return addresses[0]


def _resolve(host: str, port: int, url: str) -> list[IPAddress]:
    if _is_ip(host):
        return [ipaddress.ip_address(host)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise CallbackUrlError("invalid_callback_url",
                               f"callback_url host {host!r} does not resolve: {exc}") from exc
    seen: dict[str, IPAddress] = {}
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]
        seen.setdefault(text, ipaddress.ip_address(text))
    if not seen:
        raise CallbackUrlError("invalid_callback_url", f"callback_url host {host!r} has no address")
    return list(seen.values())


def _permitted(address: IPAddress, allow: list[IPNetwork]) -> bool:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    effective: IPAddress = mapped or address
    if any(effective.version == net.version and effective in net for net in allow):
        return True
    return effective.is_global and not effective.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
