"""The tproxy listener: iptables TPROXY in the gateway, an IP_TRANSPARENT socket, and the
original destination read from getsockname() (no NAT at all), for IPv4 and IPv6."""

import pytest

from tests.lab.origin import body_sha256

TPROXY_PORT = 8081
MARK = "0x1/0x1"
TABLE = "100"


@pytest.fixture
def tproxy_rules(lab):
    """TPROXY port 80 and 8000 from the client side to TPROXY_PORT, with the policy routing
    that delivers marked packets locally; removed (every step) at the end."""
    added = []

    def run(argv):
        lab.gateway.run(argv, check=True)

    try:
        for iptables, ip in (("iptables", ["ip"]), ("ip6tables", ["ip", "-6"])):
            for dport in ("80", "8000"):
                rule = ["PREROUTING", "-i", lab.gateway_dev, "-p", "tcp", "--dport", dport,
                        "-j", "TPROXY", "--on-port", str(TPROXY_PORT), "--tproxy-mark", MARK]
                run([iptables, "-w", "-t", "mangle", "-A", *rule])
                added.append([iptables, "-w", "-t", "mangle", "-D", *rule])
            run([*ip, "rule", "add", "fwmark", MARK, "lookup", TABLE])
            added.append([*ip, "rule", "del", "fwmark", MARK, "lookup", TABLE])
            local = "0.0.0.0/0" if iptables == "iptables" else "::/0"
            run([*ip, "route", "add", "local", local, "dev", "lo", "table", TABLE])
            added.append([*ip, "route", "del", "local", local, "dev", "lo", "table", TABLE])
        yield
    finally:
        for argv in reversed(added):
            lab.gateway.run(argv, check=False)


def test_tproxy_ipv4_and_ipv6(sluice, test_origin, nginx, lab, static_files, tproxy_rules):
    handle = sluice({"listen": [{"host": "::", "port": TPROXY_PORT, "mode": "tproxy"}],
                     "stream_large_bodies": "1m"}, dports=())
    page = static_files["/index.html"]
    for url in (lab.url("/index.html"), lab.url("/index.html", ip6=True)):
        rc, sha, size, err = lab.curl_sha256(["-g", url])
        assert (rc, sha) == (0, page.sha256), (url, err, handle.log())
    n = 5 * 1024 * 1024 + 3
    rc, sha, size, err = lab.curl_sha256(["http://%s:8000/bytes?n=%d" % (lab.origin_ip, n)])
    assert (rc, sha, size) == (0, body_sha256(n), n), err
    log = handle.log()
    assert "(tproxy)" in log
    # The destination came from getsockname(): the origin's own address, both families.
    for dest in ("%s:80" % lab.origin_ip, "[%s]:80" % lab.origin_ip6):
        flow = handle.wait_flow(lambda f: f["dest"] == dest and f["url"].endswith("/index.html"))
        assert flow["status"] == "200", flow
    handle.wait_log("response: stream (Content-Length %d" % n)
