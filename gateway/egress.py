"""Egress control: where the gateway may send HTTP requests (EHRs, token endpoints, ops
subscribers).

Two checks, the second the one that holds (docs/SECURITY.md, "Egress"):

* **on the URL text** (:meth:`EgressPolicy.check_url`), when a subscriber is registered and
  when a profile names an EHR or token URL: ``https`` only (``http`` only to a loopback
  host, and only with ``GATEWAY_EGRESS_ALLOW_LOOPBACK``); no credentials in the URL; an IP
  literal must be an address the policy allows;
* **on the resolved address, at connect time** (:class:`GuardedNetworkBackend`, the
  ``httpcore`` network backend of :func:`egress_transport`): the host is resolved once,
  every address it resolves to must be allowed, and the connection is made to the checked
  address (so a name that resolves to a public address for the first check and to
  ``169.254.169.254`` for the connection, DNS rebinding, is refused). TLS still verifies
  the certificate for the host name (httpcore passes the URL's host as SNI).

Allowed addresses are global unicast ones; link-local (cloud metadata ``169.254.169.254``,
``fe80::/10``), private (RFC 1918, ``fc00::/7``, which holds ``fd00:ec2::254``), shared
(``100.64.0.0/10``, Alibaba's ``100.100.100.200``), loopback, multicast, reserved and
unspecified addresses are refused unless the allowlist (``GATEWAY_EGRESS_ALLOWLIST``)
names them, by network (CIDR) or by host name; loopback is allowed with
``GATEWAY_EGRESS_ALLOW_LOOPBACK`` (development and tests).

Errors::

    EgressRefusedError (ValueError)              a URL the policy refuses (text)
    EgressConnectRefusedError (httpcore.ConnectError -> httpx.ConnectError)
                                                 an address refused at connect time
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import httpcore
import httpx

from gateway.logging import get_logger

log = get_logger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class EgressRefusedError(ValueError):
    """A URL the egress policy refuses (scheme, credentials, or an address it names)."""


class EgressConnectRefusedError(httpcore.ConnectError):
    """A connection refused at connect time: the host resolved to an address the egress
    policy refuses (httpx raises it as ``httpx.ConnectError``)."""


def _plain(address: IpAddress) -> IpAddress:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ip(host: str) -> IpAddress | None:
    try:
        return _plain(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


@dataclass(frozen=True)
class EgressPolicy:
    """Where outbound requests may go.

    Attributes:
        allow_loopback: loopback addresses (and ``http`` to a loopback host) are allowed:
            development and tests.
        networks: address ranges allowed although not global (``10.20.0.0/16``).
        hosts: host names (lowercase) allowed to resolve to any address.
    """

    allow_loopback: bool = False
    networks: tuple[IpNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_allowlist(cls, allowlist: Iterable[str], *, allow_loopback: bool) -> EgressPolicy:
        """The policy for allowlist entries, each a network (CIDR or one address) or a
        host name.

        Raises:
            ValueError: an entry that is neither.
        """
        networks: list[IpNetwork] = []
        hosts: set[str] = set()
        for entry in allowlist:
            entry = entry.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _HOST_NAME.fullmatch(entry.lower().rstrip(".")):
                    raise ValueError(f"{entry!r} is neither a network nor a host name") from None
                hosts.add(entry.lower().rstrip("."))
        return cls(allow_loopback=allow_loopback, networks=tuple(networks), hosts=frozenset(hosts))

    def address_allowed(self, address: IpAddress, *, host: str | None = None) -> bool:
        """True if a connection to ``address`` (resolved from ``host``) is allowed."""
        address = _plain(address)
        if host is not None and host.lower().rstrip(".") in self.hosts:
            return True
        if any(address in network for network in self.networks):
            return True
        if address.is_loopback:
            return self.allow_loopback
        return (
            address.is_global
            and not address.is_multicast
            and not address.is_reserved
            and not address.is_unspecified
            and not address.is_link_local
        )

    def check_url(self, url: str) -> None:
        """Refuse a URL the gateway must not send to (see the module docstring).

        Raises:
            EgressRefusedError: with a reason that does not repeat the URL's credentials.
        """
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise EgressRefusedError("not a valid URL") from exc
        if parsed.userinfo:
            raise EgressRefusedError("credentials in the URL are not allowed")
        host = parsed.host.lower()
        if not host:
            raise EgressRefusedError("the URL has no host")
        address = _ip(host)
        loopback = host in LOOPBACK_NAMES or (address is not None and address.is_loopback)
        if parsed.scheme == "http":
            if not (loopback and self.allow_loopback):
                raise EgressRefusedError(
                    "must be https (http only to a loopback host with "
                    "GATEWAY_EGRESS_ALLOW_LOOPBACK)"
                )
        elif parsed.scheme != "https":
            raise EgressRefusedError("must be https")
        if loopback and address is None and not self.allow_loopback:
            raise EgressRefusedError("loopback hosts are not allowed")
        if address is not None and not self.address_allowed(address, host=host):
            raise EgressRefusedError(
                "the address is link-local, private, loopback or reserved and not in "
                "GATEWAY_EGRESS_ALLOWLIST"
            )


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that resolves each host once, refuses it when any of
    its addresses is not allowed, and connects to the first checked address.

    Args:
        policy: the egress policy.
        backend: the backend that makes the connections (httpcore's AnyIO one).
    """

    def __init__(
        self, policy: EgressPolicy, backend: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.policy = policy
        self.backend = backend or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[IpAddress]:
        """Every address ``host`` resolves to, each checked.

        Raises:
            EgressConnectRefusedError: an address is not allowed (all are refused: a name
                that resolves to a public and a private address is not a public one).
            httpcore.ConnectError: the name does not resolve.
        """
        literal = _ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}") from exc
            addresses = [_plain(ipaddress.ip_address(info[4][0])) for info in infos]
        refused = [a for a in addresses if not self.policy.address_allowed(a, host=host)]
        if refused or not addresses:
            log.warning("egress.refused", host=host, port=port, addresses=len(refused))
            raise EgressConnectRefusedError(
                f"egress to {host} refused: it resolves to an address that is not allowed"
            )
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve and check ``host``, then connect to its first address."""
        addresses = await self.resolve(host, port)
        return await self.backend.connect_tcp(
            str(addresses[0]),
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: the gateway sends to HTTP(S) URLs only."""
        raise EgressConnectRefusedError("egress to a unix socket is refused")

    async def sleep(self, seconds: float) -> None:
        """The wrapped backend's sleep (httpcore's connect retries)."""
        await self.backend.sleep(seconds)


class EgressTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (its TLS verification, HTTP/1.1, limits) over a
    :class:`GuardedNetworkBackend`.

    httpx takes no network backend, so the connection pool it built is replaced by an
    equal one (same TLS context, limits and keep-alive) on the guarded backend; the
    request and error translation stay httpx's. ``ssl_context``: certificate verification
    (httpx's default: the certifi CAs), e.g. a private CA's.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        limits: httpx.Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        context = ssl_context or httpx.create_ssl_context(trust_env=False)  # once: it is slow
        super().__init__(verify=context, limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=GuardedNetworkBackend(policy),
        )


def egress_transport(
    policy: EgressPolicy,
    *,
    limits: httpx.Limits | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> EgressTransport:
    """The transport every outbound client of the gateway uses (EHR FHIR requests, token
    requests, ops webhooks)."""
    return EgressTransport(policy, limits=limits, ssl_context=ssl_context)
