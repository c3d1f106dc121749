"""The URL policy denies private networks by default (RFC 1918, CGNAT, IPv6 unique-local), like loopback, and says
how an operator admits a camera LAN. Tested through the policy function with a resolver stub: no address named
here is ever contacted."""
from __future__ import annotations

import pytest

from serve.core.api import ForbiddenSourceError
from serve.core.settings import ServeSettings
from serve.core.sources_policy import check_url_source


def _stub(table: dict[str, list[str]]):
    def resolve(host: str) -> list[str]:
        return table.get(host, [])
    return resolve


PRIVATE = ["10.1.2.3", "172.16.0.9", "172.31.255.1", "192.168.1.20", "100.64.0.1", "100.127.255.254",
           "fd00::5", "fc00::1", "::ffff:10.0.0.1", "::ffff:192.168.7.7", "169.254.169.254", "127.0.0.1", "::1"]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_local_addresses_are_denied_by_default(address):
    resolver = _stub({"cam.example": [address]})
    for url in ("rtsp://cam.example:8554/live", f"http://[{address}]/x" if ":" in address else f"http://{address}/x"):
        with pytest.raises(ForbiddenSourceError) as info:
            check_url_source(url, ServeSettings(), resolver)
        msg = str(info.value)
        assert "denied network" in msg and "serve.allow_hosts" in msg and "Fix:" in msg


def test_the_403_names_the_network_an_operator_would_admit():
    with pytest.raises(ForbiddenSourceError) as info:
        check_url_source("rtsp://cam.lan/1", ServeSettings(), _stub({"cam.lan": ["192.168.1.20"]}))
    assert 'serve.allow_hosts: ["192.168.1.0/24"]' in str(info.value)


def test_a_camera_lan_is_admitted_by_allow_hosts():
    settings = ServeSettings(allow_hosts=["192.168.1.0/24", "cam.factory"])
    resolver = _stub({"cam1": ["192.168.1.20"], "cam2": ["192.168.2.20"], "cam.factory": ["10.9.9.9"],
                      "mapped": ["::ffff:192.168.1.30"]})
    check_url_source("rtsp://cam1/live", settings, resolver)
    check_url_source("rtsp://mapped/live", settings, resolver)  # an IPv4-mapped address is its IPv4 address
    check_url_source("rtsp://cam.factory/live", settings, resolver)  # admitted by name
    with pytest.raises(ForbiddenSourceError):
        check_url_source("rtsp://cam2/live", settings, resolver)  # another private network stays denied


def test_public_hosts_pass_and_one_private_address_among_several_is_enough_to_deny():
    resolver = _stub({"public.example": ["203.0.113.7", "2001:db8::7"], "split.example": ["203.0.113.7", "10.0.0.7"]})
    check_url_source("https://public.example/live.m3u8", ServeSettings(), resolver)  # checked only, never contacted
    with pytest.raises(ForbiddenSourceError, match="10.0.0.7"):
        check_url_source("https://split.example/live.m3u8", ServeSettings(), resolver)
