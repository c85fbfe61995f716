"""No network in tests: a connection (or a name lookup) for any host but this machine's own loopback fails at once,
naming the test and the address. Offline, a test that reaches the Hub by accident does not fail: it passes after
huggingface_hub's retries (~24 s) or flakes; online, it passes on what the Hub served that day.

Installed by tests/conftest.py in the pytest process, and by the sitecustomize.py beside this file in every Python
process the tests start (conftest puts this folder on PYTHONPATH). Loopback (127.0.0.0/8, ::1, localhost: serve's
test servers), the unspecified address (0.0.0.0, ::, which Linux connects to the machine itself), Unix sockets and
other families are left alone; torch.distributed's gloo and TCPStore connect from C++ and never pass through here."""
import atexit
import ipaddress
import os
import socket
import tempfile

# the file a child process writes the attempts it made to (install(owner=True) sets it): its error may be swallowed
LOG_ENV = "TRITONGPT_NETGUARD_LOG"
seen = []  # the attempts this process made, swallowed or not: conftest fails the test that made them


class NetworkUsed(RuntimeError):
    """Not an OSError: the clients' retry and fallback paths (huggingface_hub's backoff, urllib3's, httpx's) catch
    OSError, and would retry it or go on quietly; this passes through them to the test."""


def _ip(host):
    """host's address where it is one (no lookup needed), else None."""
    if isinstance(host, (bytes, bytearray)):
        host = host.decode("ascii", "replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0])  # (an IPv6 link-local address's %scope)
    except ValueError:
        return None


def _local(host) -> bool:
    if host in (None, "", b"", "localhost", b"localhost") or str(host).endswith(".localhost"):
        return True
    ip = _ip(host)  # a host name is not: looking it up is DNS, the network
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1
    return ip is not None and (ip.is_loopback or ip.is_unspecified)


def _refuse(what):
    test = os.environ.get("PYTEST_CURRENT_TEST", "no test (collection or session setup)")
    msg = f"tests must not use the network: {test} {what} (fake what it fetches; loopback servers are fine)"
    seen.append(msg)
    log = os.environ.get(LOG_ENV)
    if log and os.getpid() != _owner:  # a child's (started or forked): the pytest process reads it after the test
        with open(log, "a") as f:  # (one short line in append mode: children's lines do not interleave)
            f.write(msg.replace("\n", " ") + "\n")
    raise NetworkUsed(msg)


def _check(sock, address, verb):
    # AF_INET and AF_INET6 alone: a Unix socket's address is a path, and other families stay on the machine
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _local(address[0]):
        _refuse(f"{verb} {address[0]}:{address[1]}" if len(address) > 1 else f"{verb} {address[0]}")


_owner = None  # the pytest process's id, where conftest installed the guard
_log = None  # its children's log
_read = 0  # how far tried_since has read it
_real = {}


def install(owner=False):
    """Wrap socket.socket's connect, connect_ex and sendto and socket.getaddrinfo (what create_connection, urllib,
    requests, httpx and asyncio all call). Once a process. owner: this is the pytest process (a pytest-xdist
    worker is one too): the children it starts from now on log their attempts to a file of its own."""
    global _owner, _log
    if owner:
        _owner = os.getpid()
        fd, _log = tempfile.mkstemp(prefix="tritongpt-netguard-", suffix=".log")
        os.close(fd)
        os.environ[LOG_ENV] = _log
        # (a child forked from this process that exits through atexit must not remove the file under it)
        atexit.register(lambda pid=_owner, path=_log: os.getpid() == pid and os.path.exists(path) and os.remove(path))
    if _real:
        return
    _real.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex, sendto=socket.socket.sendto,
                 getaddrinfo=socket.getaddrinfo)

    def connect(self, address):
        _check(self, address, "connected to")
        return _real["connect"](self, address)

    def connect_ex(self, address):
        _check(self, address, "connected to")
        return _real["connect_ex"](self, address)

    def sendto(self, data, *args):  # sendto(data, address) or sendto(data, flags, address)
        if args:
            _check(self, args[-1], "sent a datagram to")
        return _real["sendto"](self, data, *args)

    def getaddrinfo(host, port, *args, **kw):
        # an address needs no lookup (connect checks it); the machine's own name (a server bound to it) is the machine
        if not _local(host) and _ip(host) is None and host != socket.gethostname():
            _refuse(f"looked up {host!r} (port {port})")
        return _real["getaddrinfo"](host, port, *args, **kw)

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = getaddrinfo


def mark():
    """Where the attempts stand now: tried_since(mark()) after a test is what it tried."""
    return len(seen), os.path.getsize(_log)


def tried_since(mark) -> list:
    """The attempts since `mark`, this process's and its children's, each once; forgotten after (a test that checks
    the guard's error, made on purpose, is not failed for it)."""
    global _read
    n, size = mark
    tried, start = seen[n:], max(size, _read)
    if os.path.getsize(_log) > start:  # (the file opened only when a child wrote to it: a stat a test)
        with open(_log) as f:
            f.seek(start)
            tried += f.read().splitlines()
            _read = f.tell()
    del seen[n:]
    return list(dict.fromkeys(tried))
