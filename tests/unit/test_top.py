"""``sluice top``'s screen, drawn by rich into a recording console from /flows/active answers
(no socket), and where it looks for the endpoint.  Under a real pseudo-terminal against a
live proxy: tests/integration/test_admin.py."""

import argparse

import pytest
from rich.console import Console

from appliance import top
from appliance.errors import ConfigError


def answer(t, flows):
    return {"time": t, "pid": 4242, "version": "0.1.0", "uptime": 65.0, "draining": False,
            "flows": flows,
            "totals": {"connections_active": 2, "connections_total": 9,
                       "connections_served": 7, "flows_active": len(flows), "requests": 12,
                       "errors": 1, "bytes_up": 300, "bytes_down": 13 << 20, "rate": 0.0,
                       "recording": True, "recorder_written": 11, "recorder_dropped": 0}}


def flow(fid, down, expected=None, url="http://198.18.2.2:8000/big", up=0, kind="http"):
    return {"id": fid, "client": "198.18.1.2:40000", "dest": "198.18.2.2:8000", "kind": kind,
            "method": "GET" if kind == "http" else None, "url": url, "status": 200,
            "bytes_up": up, "bytes_down": down, "expected": expected, "age": 4.0,
            "rate": (up + down) / 4.0, "streamed": True}


def screen(view, width=170):
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(view.render())
    return console.export_text()


def test_known_length_gets_a_bar_and_a_percentage_and_rates_come_from_two_polls():
    view = top.View("http://127.0.0.1:8081")
    view.update(answer(100.0, [flow("a", 10 << 20, expected=50 << 20),
                               flow("b", 3 << 20, url="http://198.18.2.2:8000/chunked")]))
    view.update(answer(101.0, [flow("a", 12 << 20, expected=50 << 20),
                               flow("b", 4 << 20, url="http://198.18.2.2:8000/chunked")]))
    text = screen(view)
    (row_a,) = [line for line in text.splitlines() if "/big" in line]
    assert "24.0%" in row_a and "12.0 MiB / 50.0 MiB" in row_a and "2.0 MiB/s" in row_a
    assert "━" in row_a, "a progress bar is drawn"
    (row_b,) = [line for line in text.splitlines() if "/chunked" in line]
    assert "%" not in row_b and "4.0 MiB" in row_b and "1.0 MiB/s" in row_b
    assert "transfers 2" in text and "requests 12" in text and "errors 1" in text
    assert "recorder 11 written, 0 dropped" in text and "rate now 3.0 MiB/s" in text


def test_no_transfer_and_an_unreachable_endpoint_are_said():
    view = top.View("http://127.0.0.1:8081")
    view.update(answer(100.0, []))
    assert "no transfer in progress" in screen(view)
    view.lost("http://127.0.0.1:8081/flows/active: [Errno 111] Connection refused")
    text = screen(view)
    assert "unreachable since" in text and "Connection refused" in text and "(retrying)" in text


def test_endpoint_from_url_or_config(tmp_path):
    args = argparse.Namespace(url=None, config=None)
    assert top.endpoint(args) == "http://127.0.0.1:8081"
    args.url = "http://[::1]:9000/"
    assert top.endpoint(args) == "http://[::1]:9000"
    conf = tmp_path / "sluice.yaml"
    conf.write_text("admin: {host: '::', port: 9100}\n")
    assert top.endpoint(argparse.Namespace(url=None, config=str(conf))) == "http://[::1]:9100"
    conf.write_text("admin: {host: 127.0.0.2, port: null}\n")
    with pytest.raises(ConfigError, match="admin endpoint is off"):
        top.endpoint(argparse.Namespace(url=None, config=str(conf)))


def test_cli_without_an_admin_endpoint_is_a_config_error(tmp_path, capsys):
    from appliance import cli
    conf = tmp_path / "sluice.yaml"
    conf.write_text("admin: {port: null}\n")
    assert cli.main(["top", "-c", str(conf)]) == 2
    assert "admin.port is null" in capsys.readouterr().err
