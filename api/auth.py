"""API keys: ``Authorization: Bearer <key>`` -> the caller's tenant.

Keys are configured only as sha256 hex digests (``Settings.tenant_table``), so the server never
holds a usable key. A presented key is hashed and compared with *every* configured digest using
``hmac.compare_digest`` (no early exit), so the time taken says nothing about which digest came
close. With ``NUCSEG_AUTH=disabled`` (loopback binds only, see ``Settings.check_api_bind``) every
caller is the ``default`` tenant.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from api.errors import ApiError
from core.settings import DEFAULT_TENANT, Settings, hash_api_key

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nucseg"'}


@dataclass(frozen=True)
class KeyTable:
    """``(sha256 digest, tenant)`` pairs, looked up in constant time over the whole table."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyTable:
        pairs = [(bytes.fromhex(digest), name) for name, tenant in settings.tenant_table.items()
                 for digest in tenant.keys]
        return cls(tuple(pairs))

    def tenant_for(self, key: str) -> str | None:
        digest = bytes.fromhex(hash_api_key(key))
        found: str | None = None
        for known, tenant in self.entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = tenant
        return found


def authenticate(header: str | None, table: KeyTable, settings: Settings, server_host: str | None) -> str:
    """The tenant for an ``Authorization`` header value; raises 401 ``ApiError`` otherwise."""
    if settings.auth == "disabled":
        _require_loopback(server_host)
        return DEFAULT_TENANT
    if not header:
        raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <API key>' header",
                       headers=CHALLENGE)
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized",
                       f"Authorization scheme {scheme[:20]!r} is not accepted; send 'Bearer <API key>'",
                       headers=CHALLENGE)
    tenant = table.tenant_for(key.strip())
    if tenant is None:
        raise ApiError(401, "invalid_api_key",
                       f"the Bearer key in the Authorization header ({len(key.strip())} characters) "
                       "is not a configured API key", headers=CHALLENGE)
    return tenant


def _require_loopback(server_host: str | None) -> None:
    """Defence in depth: without auth, serve only requests that arrived on a loopback address."""
    try:
        loopback = server_host is not None and ipaddress.ip_address(server_host).is_loopback
    except ValueError:
        loopback = server_host == "localhost"
    if not loopback:
        raise ApiError(503, "auth_misconfigured",
                       f"authentication is disabled but this request arrived on {server_host!r}, "
                       "not a loopback address; the server refuses it")
