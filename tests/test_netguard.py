"""The tests' network guard (tests/netguard, installed by conftest): a connection or lookup off the machine fails at
once, naming the test and the address, in the pytest process and in the processes it starts, even where the error
is swallowed; loopback, Unix sockets and the Hub's offline switch are left as tests need them."""
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import netguard

HERE = "tests/test_netguard.py::"


def test_a_connection_off_the_machine_fails_at_once_naming_the_test_and_address():
    mark = netguard.mark()
    start = time.perf_counter()
    with pytest.raises(netguard.NetworkUsed) as e:
        socket.create_connection(("8.8.8.8", 53), timeout=30)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s, pytest.raises(netguard.NetworkUsed):
        s.sendto(b"x", ("2001:4860:4860::8888", 53))
    with pytest.raises(netguard.NetworkUsed, match="looked up 'huggingface.co' \\(port 443\\)"):
        socket.getaddrinfo("huggingface.co", 443)  # before DNS, which offline may take seconds to fail
    assert time.perf_counter() - start < 1
    name = f"{HERE}test_a_connection_off_the_machine_fails_at_once_naming_the_test_and_address (call)"
    assert str(e.value) == (f"tests must not use the network: {name} connected to 8.8.8.8:53 (fake what it fetches; "
                            f"loopback servers are fine)")
    assert len(netguard.tried_since(mark)) == 3  # (and forgotten: this test made them on purpose)


def test_an_attempt_whose_error_was_swallowed_is_still_the_tests():
    """huggingface_hub (and hub_datasets' fallback to the cache) catch the error: the test fails after it anyway."""
    mark = netguard.mark()
    try:
        urllib.request.urlopen("http://example.com/", timeout=30)
    except Exception:
        pass
    (tried,) = netguard.tried_since(mark)
    assert "test_an_attempt_whose_error_was_swallowed_is_still_the_tests (call) looked up 'example.com'" in tried


def test_a_process_the_test_starts_is_guarded_and_its_attempts_reported():
    mark = netguard.mark()
    code = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=30)\n"
            "except Exception as e:\n    print(type(e).__name__ + ': ' + str(e))\n")  # swallowed in the child
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    name = f"{HERE}test_a_process_the_test_starts_is_guarded_and_its_attempts_reported (call)"
    assert out.stdout.startswith(f"NetworkUsed: tests must not use the network: {name} connected to 1.1.1.1:443"), \
        (out.stdout, out.stderr)
    (tried,) = netguard.tried_since(mark)
    assert f"{name} connected to 1.1.1.1:443" in tried


def serve_once(server):
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"ok")


def test_loopback_and_unix_sockets_still_work(tmp_path):
    addresses = [("127.0.0.1", socket.AF_INET), ("localhost", socket.AF_INET)]
    if socket.has_ipv6:
        addresses.append(("::1", socket.AF_INET6))
    for host, family in addresses:
        try:
            server = socket.create_server((host, 0), family=family)
        except OSError:  # (a machine without IPv6 on its loopback)
            continue
        with server:
            accepted = threading.Thread(target=lambda: serve_once(server))
            accepted.start()
            with socket.create_connection((host, server.getsockname()[1]), timeout=30) as c:
                assert c.recv(2) == b"ok"
            accepted.join()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        r.bind(("127.0.0.1", 0))
        s.sendto(b"hi", r.getsockname())
        assert r.recv(2) == b"hi"
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as c:
        server.bind(path)
        server.listen()
        c.connect(path)
        server.accept()[0].close()


def test_the_hub_is_offline_here_and_in_the_processes_tests_start():
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('HF_HUB_OFFLINE'))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "1\n", out.stderr
