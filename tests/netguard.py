"""Sockets blocked for the whole test suite: any connect to a non-loopback address raises.

``tests/conftest.py`` applies :func:`block_network` to every test (autouse fixture); subprocess workers call it
themselves. Loopback (127.0.0.0/8, ::1, localhost) and unix sockets stay open: Jupyter kernels (notebook tests) and
headless Chromium (view tests) talk over them.
"""

from __future__ import annotations

import ipaddress
import socket

_REAL = {}


class NetworkBlocked(RuntimeError):
    pass


def _allowed(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost: it would need DNS and the network
        return False


def _guard(name):
    real = _REAL[name]

    def method(self, address, *args, **kwargs):
        if self.family != socket.AF_UNIX and not _allowed(address):
            raise NetworkBlocked(f"network access blocked in tests: socket.{name}({address!r}); only loopback and "
                                 f"unix sockets are allowed (tests must run offline)")
        return real(self, address, *args, **kwargs)

    method.__name__ = name
    return method


def _guard_sendto(self, data, *args):
    address = args[-1]
    if self.family != socket.AF_UNIX and not _allowed(address):
        raise NetworkBlocked(f"network access blocked in tests: socket.sendto(..., {address!r})")
    return _REAL["sendto"](self, data, *args)


def block_network() -> None:
    """Patch ``socket.socket.connect/connect_ex/sendto`` to refuse non-loopback addresses (idempotent)."""
    if _REAL:
        return
    for name in ("connect", "connect_ex", "sendto"):
        _REAL[name] = getattr(socket.socket, name)
    socket.socket.connect = _guard("connect")
    socket.socket.connect_ex = _guard("connect_ex")
    socket.socket.sendto = _guard_sendto


def unblock_network() -> None:
    for name, fn in _REAL.items():
        setattr(socket.socket, name, fn)
    _REAL.clear()
