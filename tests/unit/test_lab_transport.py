"""Which transport each VM gets: scenario pins win, the run-time option fills in `auto`."""


import pytest

from vmlab.hostcheck import TransportUnavailable, vhost_vsock_usable
from vmlab.lab import Lab
from vmlab.scenario import Scenario, VmSpec, inline_scenario


def transports(scenario: Scenario, option: str | None) -> dict:
    return Lab(scenario, transport=option)._resolve_transports()


def test_option_fills_in_auto_and_keeps_pins():
    scenario = inline_scenario(vms=[VmSpec(name="pinned", transport="vhost-user"), VmSpec(name="free"),
                                    VmSpec(name="none", vsock=False)])
    assert transports(scenario, "vhost-user") == {"pinned": "vhost-user", "free": "vhost-user", "none": None}


@pytest.mark.skipif(vhost_vsock_usable().ok, reason="this host has vhost-vsock: the refusal cannot happen")
def test_vhost_option_is_refused_here_for_auto_vms_but_not_for_pinned_ones():
    pinned = inline_scenario(vms=[VmSpec(name="p")], transport="vhost-user")
    assert transports(pinned, "vhost") == {"p": "vhost-user"}
    with pytest.raises(TransportUnavailable, match="vhost"):
        transports(inline_scenario(vms=[VmSpec(name="a")]), "vhost")


def test_auto_without_option_resolves_per_host():
    got = transports(inline_scenario(vms=[VmSpec(name="a")]), None)["a"]
    assert got == ("vhost" if vhost_vsock_usable().ok else "vhost-user")
