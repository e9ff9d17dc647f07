"""PLC adapters of a triggered line: the handshake state machine (handshake.py, written once) and the
protocols that carry it (modbus.py: Modbus TCP with a fixed map, modbus_security.py its TLS variant;
opcua.py: OPC UA Machine Vision; trust.py: the client certificates both admit). servers.py starts them
from PlcSettings, aio.py runs each one's asyncio loop on a thread, offline.py is the line's one offline."""

from mrkd.errors import MrkdError


class PlcError(MrkdError, ValueError):
    """A PLC server that cannot run or a PLC setting out of range; the message names the option or
    field and the address."""


def known_host(host: str) -> bool:
    """Whether a server could listen on ``host``: an IP address, or a name this machine resolves."""
    import ipaddress
    import socket
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):       # socket.gaierror is an OSError; a name IDNA cannot encode
        return False
    return True
