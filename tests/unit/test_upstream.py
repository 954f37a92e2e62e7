"""Original-destination helpers: address normalising and the loop guard (pure parts)."""

import pytest

from appliance import upstream

OWN = {"198.18.1.1", "fd00:5c:1::1", "0.0.0.0", "::", "127.0.0.1", "::1"}


@pytest.mark.parametrize("text,expected", [
    ("::ffff:198.18.2.2", "198.18.2.2"),
    ("198.18.2.2", "198.18.2.2"),
    ("FD00:5C:1::0001", "fd00:5c:1::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("not-an-ip", "not-an-ip"),
])
def test_normalize_ip(text, expected):
    assert upstream.normalize_ip(text) == expected


@pytest.mark.parametrize("dst,loop", [
    pytest.param(("198.18.1.1", 8080), True, id="own-address-own-port"),
    pytest.param(("::ffff:198.18.1.1", 8080), True, id="mapped-own-address"),
    pytest.param(("fd00:5c:1::1", 8080), True, id="own-ipv6"),
    pytest.param(("127.0.0.5", 8080), True, id="any-loopback"),
    pytest.param(("198.18.1.1", 80), False, id="own-address-other-port"),
    pytest.param(("198.18.2.2", 8080), False, id="other-host-same-port"),
])
def test_loop_guard(dst, loop):
    assert upstream.is_loop(dst, OWN, {8080}) is loop


def test_local_addresses_are_every_interface_address():
    # What the kernel says this box's addresses are (ip -j addr) must all be found.
    import json
    import subprocess
    listed = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True,
                                       text=True).stdout)
    kernel = {upstream.normalize_ip(a["local"]) for link in listed for a in link.get("addr_info", [])}
    assert kernel and kernel <= upstream.local_addresses(), kernel - upstream.local_addresses()
