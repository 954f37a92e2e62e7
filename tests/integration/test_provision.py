"""The Vagrant lab and its gateway provisioning script.

Vagrant cannot run here, so: `ruby -c` parses the Vagrantfile, and a stand-in for Vagrant's
configuration API (tests/data/vagrant/stub.rb) loads it and reports what it declares (three
machines on two private networks, the client's default route via the gateway, the gateway
provisioned by deploy/gateway.sh).  Then deploy/gateway.sh itself runs inside the lab's gateway
namespace, on the shipped etc/sluice.yaml, as `make demo` runs it, and a client's exchange is
intercepted, IPv4 and IPv6; running it again changes nothing; `sluice iptables remove` undoes
it all.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

import pytest

from tests.lab.netns import REPO_ROOT, child_env
from tests.lab.provision import SCRIPT, SLUICE, intercept_off, provision_gateway

VAGRANTFILE = REPO_ROOT / "Vagrantfile"


def ruby(*args):
    if shutil.which("ruby") is None:
        pytest.fail("ruby is missing: apt-get install ruby (make deps)", pytrace=False)
    return subprocess.run(["ruby", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


def test_vagrantfile_parses():
    out = ruby("-c", VAGRANTFILE)
    assert (out.returncode, out.stdout.strip()) == (0, "Syntax OK"), out.stderr


def test_vagrantfile_declares_the_lab():
    out = ruby(REPO_ROOT / "tests" / "data" / "vagrant" / "stub.rb", VAGRANTFILE)
    assert out.returncode == 0, out.stderr
    machines = json.loads(out.stdout)["machines"]
    assert sorted(machines) == ["client", "gateway", "origin"]

    def nets(name):
        return {n["virtualbox__intnet"]: ipaddress.ip_interface(n["ip"] + "/24")
                for n in machines[name]["networks"] if n["type"] == "private_network"}
    client, gateway, origin = nets("client"), nets("gateway"), nets("origin")
    assert set(client) == {"sluice-lan"} and set(origin) == {"sluice-wan"}
    assert set(gateway) == {"sluice-lan", "sluice-wan"}
    assert client["sluice-lan"].network == gateway["sluice-lan"].network
    assert origin["sluice-wan"].network == gateway["sluice-wan"].network
    assert client["sluice-lan"].network != origin["sluice-wan"].network

    routes = [p["inline"] for p in machines["client"]["provisioners"] if p.get("run") == "always"]
    assert routes == ["ip route replace default via %s" % gateway["sluice-lan"].ip]
    assert machines["client"]["provisioners"][-1]["inline"] == routes[0]   # last: after apt
    back = [p["inline"] for p in machines["origin"]["provisioners"] if p.get("run") == "always"]
    assert back == ["ip route replace %s via %s" % (client["sluice-lan"].network,
                                                   gateway["sluice-wan"].ip)]

    (provisioner,) = machines["gateway"]["provisioners"]
    assert provisioner["path"] == str(SCRIPT.relative_to(REPO_ROOT))
    assert provisioner["env"]["SLUICE_LAN_ADDR"] == str(gateway["sluice-lan"].ip)
    synced = {f["dst"]: f for f in machines["gateway"]["synced_folders"]}
    assert synced[provisioner["env"]["SLUICE_SRC"]]["src"] == "."


def test_script_is_posix_sh():
    for shell in ("sh", "bash"):
        out = subprocess.run([shell, "-n", str(SCRIPT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def wait_flows(handle, count, timeout=5.0):
    """The number of flows in Sluice's access log once it reaches `count` (or the timeout)."""
    return len(handle.wait_flows(count=count, timeout=timeout))


def snapshot(lab):
    return [lab.gateway.run(argv, capture_output=True, text=True, check=True).stdout
            .replace("\r", "") for argv in (["iptables-save"], ["ip6tables-save"], ["ip", "rule"])]


def without_comments(state):
    return ["".join(l for l in text.splitlines(True) if not l.startswith("#")) for text in state]


def test_script_provisions_the_lab_gateway(lab, sluice, static_files):
    """The shipped config as the operator gets it, Sluice running on it, then the script."""
    handle = sluice((REPO_ROOT / "etc" / "sluice.yaml").read_text(), dports=())
    assert "  interfaces: null\n" in handle.config_path.read_text()
    before = without_comments(snapshot(lab))
    try:
        out = provision_gateway(lab, handle.config_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "LAN interfaces [%s] written into" % lab.gateway_dev in out.stdout
        assert "  interfaces: [%s]\n" % lab.gateway_dev in handle.config_path.read_text()
        assert "iptables -w -t nat -A PREROUTING -i %s -j SLUICE-8080" % lab.gateway_dev \
            in out.stdout
        page = static_files["/index.html"].path.read_bytes()
        for url in (lab.url("/index.html"), lab.url("/index.html", ip6=True)):
            rc, body, err = lab.curl(["-g", url])
            assert (rc, body) == (0, page), err
        assert wait_flows(handle, 2) == 2
        for origin in (lab.origin_ip, lab.origin_ip6):
            assert any(f["dest"] in ("%s:80" % origin, "[%s]:80" % origin) and f["url"].endswith("/index.html")
                       and f["status"] == "200" for f in handle.flows())

        applied = without_comments(snapshot(lab))
        again = provision_gateway(lab, handle.config_path)   # re-provisioning is harmless
        assert again.returncode == 0, again.stdout + again.stderr
        assert "names its interfaces already" in again.stdout
        assert without_comments(snapshot(lab)) == applied
    finally:
        removed = intercept_off(lab, handle.config_path)
    assert removed.returncode == 0, removed.stderr
    assert without_comments(snapshot(lab)) == before


def test_script_finds_the_lan_by_address_and_starts_from_the_shipped_config(lab, tmp_path):
    """The Vagrant gateway's way: no config yet, the LAN named by one of its addresses."""
    config = tmp_path / "etc" / "sluice.yaml"
    env = child_env({"SLUICE_INSTALL": "0", "SLUICE_SYSTEMD": "0", "SLUICE": SLUICE,
                     "SLUICE_CONFIG": str(config), "SLUICE_LAN_ADDR": lab.gateway_ip})
    out = lab.gateway.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "starting from the shipped default" in out.stdout
        shipped = (REPO_ROOT / "etc" / "sluice.yaml").read_text()
        assert config.read_text() == shipped.replace(
            "  interfaces: null\n", "  interfaces: [%s]\n" % lab.gateway_dev)
        assert "-A PREROUTING -i %s -j SLUICE-8080" % lab.gateway_dev in "".join(snapshot(lab))
    finally:
        removed = intercept_off(lab, config)
    assert removed.returncode == 0, removed.stderr
    env["SLUICE_LAN_ADDR"] = "192.0.2.99"                  # on no interface of the gateway
    config.unlink()
    out = lab.gateway.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert out.returncode == 1 and "no interface holds 192.0.2.99" in out.stdout
