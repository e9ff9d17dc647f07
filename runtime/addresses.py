"""Whether a listening address (or the host a request names) means this machine only.

Every server that takes commands (the operator page, Modbus, OPC UA) binds to 127.0.0.1 by default and
asks for authentication it can check before it listens anywhere else; this is the one test of "else".
"""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """"127.0.0.1", "::1", "[::1]", "localhost" -> True; a network address or any other host name -> False."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
