"""Where a connection was going, and getting there.

Owns: the original destination of an intercepted connection (``SO_ORIGINAL_DST`` for IPv4,
``IP6T_SO_ORIGINAL_DST`` for IPv6, ``getsockname()`` under TPROXY), this box's own addresses
for the loop guard, and connecting to the origin with a timeout.  Must not touch: HTTP.
OS errors are translated here into ``ConnectFailed`` / ``ConnectTimeout``.
"""

import ipaddress
import socket
import struct

import gevent
from gevent import socket as gsocket

from .errors import BadHost, ConnectFailed, ConnectTimeout, Forbidden, LoopDetected

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80     # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75


def normalize_ip(host):
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; anything else unchanged (scope ids dropped)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def original_dst(sock, mode):
    """The (host, port) the client was connecting to before interception."""
    local = sock.getsockname()
    if mode == "tproxy":
        return normalize_ip(local[0]), local[1]
    mapped = sock.family == socket.AF_INET6 and local[0].startswith("::ffff:")
    try:
        if sock.family == socket.AF_INET or mapped:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError:
        # No NAT entry: the client connected to us directly.  The loop guard catches it.
        return normalize_ip(local[0]), local[1]


def local_addresses():
    """Every address of this box: all interfaces, both families, plus the unspecified ones."""
    import netifaces  # imported here: only the server needs it
    found = {"0.0.0.0", "::", "127.0.0.1", "::1"}
    for name in netifaces.interfaces():
        for family in (netifaces.AF_INET, netifaces.AF_INET6):
            for entry in netifaces.ifaddresses(name).get(family, ()):
                found.add(normalize_ip(entry["addr"]))
    return found


def is_loop(dst, own_addresses, own_ports):
    """True when ``dst`` is one of this box's addresses on a Sluice listening port."""
    host, port = dst
    if port not in own_ports:
        return False
    host = normalize_ip(host)
    if host in own_addresses:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_only(ip):
    """Loopback or unspecified: this gateway itself, never a LAN client's destination."""
    try:
        addr = ipaddress.ip_address(normalize_ip(ip))
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def _literal(host, port):
    """getaddrinfo's answer for an IP literal, without a name lookup (an intercepted
    connection's destination always is one): no thread of the resolver's pool per connect."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]


def connect(dst, timeout, own=None, deny_local=False):
    """A connected gevent socket to ``dst``; ``ConnectFailed`` (502) or ``ConnectTimeout``.
    ``own`` is (addresses, ports) of this box's listeners: a name that resolves to one of them
    is a loop (``LoopDetected``), checked before any connection is made; ``deny_local``
    refuses names that resolve to loopback (``Forbidden``: an explicit proxy's clients must
    not reach the gateway's own local services).  A name that cannot be a host name is
    ``BadHost`` (400)."""
    host, port = dst
    if not 1 <= port <= 65535:
        raise ConnectFailed("invalid port %d" % port)
    try:
        host.encode("idna")
    except UnicodeError:
        raise BadHost("not a valid host name: %r" % (host,)) from None
    try:
        with gevent.Timeout(timeout, ConnectTimeout("no connection to %s:%d within %gs" % (
                host, port, timeout))):
            infos = _literal(host, port) or gsocket.getaddrinfo(host, port, 0,
                                                                socket.SOCK_STREAM)
            for info in infos:
                if own is not None and is_loop((info[4][0], port), *own):
                    raise LoopDetected("%s:%d resolves to %s, Sluice itself (loop)" % (
                        host, port, info[4][0]))
                if deny_local and is_local_only(info[4][0]):
                    raise Forbidden("%s:%d is this gateway's own loopback" % (host, port))
            last = None
            for family, kind, proto, _, address in infos:
                sock = gsocket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect(address)
                    return sock
                except OSError as exc:
                    sock.close()
                    last = exc
            raise ConnectFailed("cannot connect to %s:%d: %s" % (
                host, port, last.strerror if last else "no address")) from last
    except UnicodeError:
        raise BadHost("not a valid host name: %r" % (host,)) from None
    except OSError as exc:
        raise ConnectFailed("cannot connect to %s:%d: %s" % (host, port, exc)) from exc
