"""The benchmark's own parsing and arithmetic (tests.bench): wrk's output, chunked bodies as
the bench client decodes them, the REDIRECT counters, medians with min-max, targets.  No root,
no network: a wrong parse here would make `make bench` flatter or blame a peer."""

import hashlib

import pytest

from tests.bench import report
from tests.bench.client import ClientError, dechunk, parse_head
from tests.bench.proxy import count_redirected

WRK_OK = """\
Running 3s test @ http://198.18.2.2/1k.bin
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.45ms    1.20ms  20.31ms   85.12%
    Req/Sec    10.21k     1.02k   12.30k    70.00%
  Latency Distribution
     50%  812.00us
     75%    2.80ms
     90%    3.50ms
     99%    1.20s
  61000 requests in 3.00s, 70.12MB read
Requests/sec:  20333.33
Transfer/sec:     23.37MB
"""
WRK_ERRORS = WRK_OK.replace("Requests/sec", "  Socket errors: connect 0, read 3, write 0, timeout 0\n"
                            "  Non-2xx or 3xx responses: 12\nRequests/sec")


def test_wrk_parsed_with_units():
    wrk = report.parse_wrk(WRK_OK)
    assert wrk == {"rps": 20333.33, "requests": 61000, "p50_ms": pytest.approx(0.812), "p99_ms": 1200.0,
                   "socket_errors": "", "non_2xx": 0}


def test_wrk_errors_and_non_2xx_found():
    wrk = report.parse_wrk(WRK_ERRORS)
    assert wrk["socket_errors"] == "Socket errors: connect 0, read 3, write 0, timeout 0"
    assert wrk["non_2xx"] == 12


def test_wrk_without_latency_distribution_is_not_parsed():
    assert report.parse_wrk(WRK_OK.replace("     99%    1.20s\n", "")) is None


PAYLOAD = bytes(range(256)) * 100


@pytest.mark.parametrize("wire", [
    pytest.param(b"%x\r\n%s\r\n0\r\n\r\n" % (len(PAYLOAD), PAYLOAD), id="one-chunk"),
    pytest.param(b"".join(b"%x\r\n%s\r\n" % (len(PAYLOAD[i:i + 1000]), PAYLOAD[i:i + 1000])
                          for i in range(0, len(PAYLOAD), 1000)) + b"0\r\n\r\n", id="rechunked"),
    pytest.param(b"%X;ext=1\r\n%s\r\n0\r\n\r\n" % (len(PAYLOAD), PAYLOAD), id="extension-upper-hex"),
])
def test_dechunk_hashes_the_payload(wire):
    assert dechunk(memoryview(wire)) == (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())


def test_dechunk_refuses_a_chunk_without_its_crlf():
    with pytest.raises(ClientError, match="not followed by CRLF"):
        dechunk(memoryview(b"5\r\nhello!!\r\n0\r\n\r\n"))


def test_response_head_fields_lowercased():
    status, fields = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nTransfer-Encoding:chunked")
    assert (status, fields) == (200, {"content-length": "12", "transfer-encoding": "chunked"})


IPTABLES = """\
Chain PREROUTING (policy ACCEPT 0 packets, 0 bytes)
    pkts      bytes target     prot opt in     out     source               destination
      51     3060 REDIRECT   6    --  slgc1 *       0.0.0.0/0            0.0.0.0/0            tcp dpt:80 redir ports 8080
       2      120 REDIRECT   6    --  slgc1 *       0.0.0.0/0            0.0.0.0/0            tcp dpt:8000 redir ports 8080
       7      420 REDIRECT   6    --  slgc1 *       0.0.0.0/0            0.0.0.0/0            tcp dpt:80 redir ports 80800
"""


def test_redirect_counters_summed_for_one_port_only():
    assert count_redirected(IPTABLES, 8080) == 53
    assert count_redirected(IPTABLES, 8081) == 0


def results(**tests):
    return {test: peers for test, peers in tests.items()}


def test_cell_median_spread_and_failures():
    res = results(small={"sluice": [{"rps": 300.0}, {"rps": 100.0}, {"fail": "wrk: 3 non-2xx"}, {"rps": 200.0}]})
    assert report.cell(res, "small", "sluice", "rps", "%.0f") == ("200 FAIL", "100–300")
    assert report.cell(res, "small", "squid", "rps", "%.0f") == ("·", "")
    assert report.cell(results(small={"sluice": [{"fail": "x"}]}), "small", "sluice", "rps", "%.0f") == ("FAIL", "")
    assert report.any_failed(res)


ENV = {"settings": {"reps": 1, "big": 1 << 30, "idle": 10000, "bulk_count": 100, "bulk_size": 8 << 20}}


def test_targets_pass_miss_and_missing():
    res = results(small={"sluice": [{"rps": 3000.0, "p99_ms": 9.0, "cpu_us": 40.0}], "squid": [{"rps": 2000.0}],
                         "mitmproxy": [{"rps": 100.0}], "sluice-hooks": [{"fail": "died"}]},
                  bulk={"sluice-buffer": [{"mbps": 1.0, "peak_rss_mib": 864.0}]})
    by_name = {t["name"]: t for t in report.targets(res, ENV)}
    assert by_name["small req/s: Sluice / Squid"]["status"] == "PASS"            # 1.5x exactly
    assert by_name["small req/s: Sluice / mitmproxy"]["status"] == "PASS"        # 30x
    assert by_name["small p99 latency, Sluice (ms)"]["status"] == "MISS"         # 9 > 8
    assert by_name["small req/s: Sluice hooks+10 rules / Sluice"]["status"] == "FAIL"
    assert by_name["bulk: Sluice buffer peak RSS (MiB)"]["status"] == "PASS"     # 800 + 64
    assert by_name["download MB/s: Sluice / HAProxy splice"]["status"] == "FAIL"  # not measured


def test_readme_table_uses_the_buffering_peer_for_memory():
    res = results(bulk={"sluice-buffer": [{"mbps": 100.0, "peak_rss_mib": 900.0}],
                        "sluice": [{"mbps": 400.0, "peak_rss_mib": 46.0}]},
                  small={"direct": [{"rps": 30000.0, "p99_ms": 5.0, "cpu_us": 0.0}]})
    table = report.readme_table({"results": res, "environment": ENV}).splitlines()
    assert table[0].startswith("| median of 1 | direct | Sluice |")
    memory = next(line for line in table if line.startswith("| peak RSS, 100 × 8 MiB"))
    assert memory.split(" | ")[2] == "900"
    small = next(line for line in table if line.startswith("| small requests/s"))
    assert small.split(" | ")[1] == "30000"
    assert next(line for line in table if line.startswith("| small requests: p99")).split(" | ")[1] == "5.0"
    assert next(line for line in table if line.startswith("| proxy CPU per small")).split(" | ")[1] == "–"
