"""Which PLC servers a triggered line runs (``mrkd run --modbus HOST:PORT --opcua opc.tcp://HOST:PORT``,
or ``[plc]`` in the line file) and starting them on the line's one trigger API. The CLI only parses
options and calls these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import click

from mrkd.errors import warning_line
from mrkd.options import IntegerRange
from mrkd.runtime.plc import PlcError
from mrkd.runtime.plc.handshake import RESULTS_BUFFER

PLC_SETTINGS_VERSION = 3      # 2: modbus_allow; 3: modbus_certificate, _private_key, _trust, _write_roles
PLC_FIELDS = ("modbus", "modbus_allow", "results_buffer", "opcua", "opcua_user", "opcua_password_env",
              "opcua_anonymous_calls", "opcua_certificate", "opcua_private_key", "opcua_trust",
              "modbus_certificate", "modbus_private_key", "modbus_trust", "modbus_write_roles")


def _named(prefix: str, key: str) -> str:
    """A setting as its source spells it: ``--opcua-user`` on the command line (prefix "--"),
    ``line.toml: plc.opcua_user`` in a line file (prefix "line.toml: plc." or "plc.")."""
    return prefix + (key.replace("_", "-") if prefix.endswith("--") else key)


@dataclass(frozen=True)
class PlcSettings:
    """modbus: "HOST:PORT" of the Modbus TCP server (None: off). modbus_allow: the client addresses or
    networks it admits, comma-separated (None: any). modbus_certificate + modbus_private_key +
    modbus_trust: Modbus/TCP Security (TLS, a client certificate the trust folder admits);
    modbus_write_roles: the certificate roles that may write, comma-separated (None: any). Listening
    beyond this machine needs modbus_allow or Modbus/TCP Security. results_buffer: results held for
    the PLC, the presented one included (1..64). opcua: "opc.tcp://HOST:PORT" of the OPC UA
    VisionSystem (None: off); opcua_user + opcua_password_env (the environment variable holding the
    password): who may call its methods; opcua_anonymous_calls: anonymous clients may call them too;
    opcua_certificate + opcua_private_key: serve Basic256Sha256 Sign&Encrypt only; opcua_trust: a
    folder of the client certificates allowed to connect (others are refused)."""

    modbus: Optional[str] = None
    results_buffer: int = RESULTS_BUFFER
    opcua: Optional[str] = None
    opcua_user: Optional[str] = None
    opcua_password_env: Optional[str] = None
    opcua_anonymous_calls: bool = False
    opcua_certificate: Optional[str] = None
    opcua_private_key: Optional[str] = None
    opcua_trust: Optional[str] = None
    modbus_allow: Optional[str] = None     # after the fields of version 1: they keep their positions
    modbus_certificate: Optional[str] = None      # version 3
    modbus_private_key: Optional[str] = None
    modbus_trust: Optional[str] = None
    modbus_write_roles: Optional[str] = None
    schema_version: int = PLC_SETTINGS_VERSION

    def check(self, where: str = "") -> "PlcSettings":
        """Raise PlcError naming the field; returns self."""
        from mrkd.runtime.addresses import is_loopback_host
        from mrkd.runtime.plc.modbus import admits_every_address, parse_client_networks, parse_modbus_address
        field = where.rpartition(": ")[2]     # a second field named in a message: "--" or "plc.", no file again

        def named(key: str) -> str:           # the field at fault, as its source spells it
            return _named(where, key)

        def also(key: str) -> str:            # another field the message names
            return _named(field, key)

        security = (self.modbus_certificate, self.modbus_private_key, self.modbus_trust)
        if any(value is not None for value in security):
            if self.modbus is None:
                raise PlcError(f"{named('modbus_certificate/_private_key/_trust')} need {field}modbus")
            if any(value is None for value in security):
                raise PlcError(f"{named('modbus_certificate')}, {also('modbus_private_key')} and "
                               f"{also('modbus_trust')} go "
                               f"together (Modbus/TCP Security authenticates both ends)")
            for path in security[:2]:
                if not Path(path).is_file():
                    raise PlcError(f"{where}modbus certificate/key: file not found: {path}")
            if not Path(self.modbus_trust).is_dir():
                raise PlcError(f"{named('modbus_trust')}: not a folder: {self.modbus_trust}")
        if self.modbus_write_roles is not None:
            from mrkd.runtime.plc.modbus_security import parse_roles
            if self.modbus_trust is None:
                raise PlcError(f"{named('modbus_write_roles')} needs Modbus/TCP Security "
                               f"({also('modbus_certificate')}, {also('modbus_private_key')}, "
                               f"{also('modbus_trust')}): roles come from client certificates")
            try:
                parse_roles(self.modbus_write_roles)
            except PlcError as exc:
                raise PlcError(f"{named('modbus_write_roles')}: {exc}") from None
        if self.modbus is not None:
            host, _ = parse_modbus_address(self.modbus, name=f"{where}modbus")
            if self.modbus_allow is None and self.modbus_trust is None and not is_loopback_host(host):
                raise PlcError(f"{where}modbus {self.modbus} listens beyond this machine: name the PLC's address "
                               f"with {also('modbus_allow')} (e.g. 10.0.0.5 or 10.0.0.0/24), or authenticate it with "
                               f"Modbus/TCP Security ({also('modbus_certificate')}, {also('modbus_private_key')}, "
                               f"{also('modbus_trust')}); plain Modbus TCP has no authentication, so the client's "
                               f"address is all the server can check")
        if self.modbus_allow is not None:
            if self.modbus is None:
                raise PlcError(f"{named('modbus_allow')} needs {field}modbus")
            try:
                networks = parse_client_networks(self.modbus_allow)
            except PlcError as exc:
                raise PlcError(f"{named('modbus_allow')}: {exc}") from None
            every = admits_every_address(networks)
            if every is not None:       # it would stand in for the check a server beyond 127.0.0.1 needs
                raise PlcError(f"{named('modbus_allow')} {self.modbus_allow} admits every IPv{every} address, so it "
                               f"checks no client: name the PLC's address or network (e.g. 10.0.0.5 or 10.0.0.0/24)")
        if not isinstance(self.results_buffer, int) or isinstance(self.results_buffer, bool) \
                or not 1 <= self.results_buffer <= 64:
            raise PlcError(f"{where}results_buffer: expected 1..64 results, got {self.results_buffer!r}")
        if self.opcua is not None:
            from mrkd.runtime.plc.opcua import parse_opcua_url
            host, _ = parse_opcua_url(self.opcua, name=f"{where}opcua")
            if not is_loopback_host(host):     # reachable from the network: callers must be authenticated
                if self.opcua_anonymous_calls is True and self.opcua_trust is None:
                    raise PlcError(f"{named('opcua_anonymous_calls')} with {field}opcua {self.opcua}: anyone on "
                                   f"the network "
                                   f"could start jobs; admit known clients only ({also('opcua_trust')} with "
                                   f"{also('opcua_certificate')}) or listen on 127.0.0.1")
                if self.opcua_user is not None and self.opcua_certificate is None:
                    raise PlcError(f"{where}opcua {self.opcua} with {also('opcua_user')} but no "
                                   f"{also('opcua_certificate')}: "
                                   f"the password would cross the network unencrypted; give the server a "
                                   f"certificate (Basic256Sha256 Sign&Encrypt) or listen on 127.0.0.1")
        if (self.opcua_user is None) != (self.opcua_password_env is None):
            raise PlcError(f"{named('opcua_user')} and {also('opcua_password_env')} go together")
        if (self.opcua_certificate is None) != (self.opcua_private_key is None):
            raise PlcError(f"{named('opcua_certificate')} and {also('opcua_private_key')} go together")
        for path in (self.opcua_certificate, self.opcua_private_key):
            if path is not None and not Path(path).is_file():
                raise PlcError(f"{where}opcua certificate/key: file not found: {path}")
        if self.opcua_trust is not None:
            if self.opcua_certificate is None:
                raise PlcError(f"{named('opcua_trust')} needs {also('opcua_certificate')} and "
                               f"{also('opcua_private_key')} "
                               f"(client certificates are only exchanged with Sign&Encrypt)")
            if not Path(self.opcua_trust).is_dir():
                raise PlcError(f"{named('opcua_trust')}: not a folder: {self.opcua_trust}")
        if not isinstance(self.opcua_anonymous_calls, bool):
            raise PlcError(f"{where}opcua_anonymous_calls: expected true or false")
        return self

    def opcua_password(self) -> Optional[str]:
        """The OPC UA password from its environment variable (PlcError naming the variable)."""
        import os
        if self.opcua_password_env is None:
            return None
        value = os.environ.get(self.opcua_password_env)
        if not value:
            raise PlcError(f"the OPC UA password's environment variable {self.opcua_password_env} (--opcua-password-env, "
                           f"or plc.opcua_password_env in the line file) is not set or empty; set it before mrkd run")
        return value

    @property
    def wanted(self) -> bool:
        return self.modbus is not None or self.opcua is not None

    @classmethod
    def from_table(cls, table: Any, where: str) -> "PlcSettings":
        """A line file's ``[plc]`` table (``where``: "line.toml: plc.")."""
        if not isinstance(table, dict):
            raise PlcError(f"{where.rstrip('.')}: expected a table ([plc])")
        unknown = sorted(set(table) - set(PLC_FIELDS))
        if unknown:
            raise PlcError(f"{where}{unknown[0]}: unknown field (known: {', '.join(PLC_FIELDS)})")
        for name in ("modbus", "modbus_allow", "opcua", "opcua_user", "opcua_password_env", "opcua_certificate",
                     "opcua_private_key", "opcua_trust", "modbus_certificate", "modbus_private_key", "modbus_trust",
                     "modbus_write_roles"):
            if table.get(name) is not None and not isinstance(table[name], str):
                raise PlcError(f"{where}{name}: expected text, got {table[name]!r}")
        return cls(**{name: table[name] for name in PLC_FIELDS if name in table}).check(where)


def plc_options(command):
    """``mrkd run``'s PLC options."""
    options = [
        click.option("--modbus", "modbus", metavar="HOST:PORT", default=None,
                     help="Serve the PLC handshake over Modbus TCP (the map in docs/PLC.md; any unit id), e.g. "
                          "127.0.0.1:5020; 0.0.0.0:502 for the cell network (with --modbus-allow). A trigger "
                          "source for --trigger software/hardware. Default bind 127.0.0.1. Line file: [plc] modbus "
                          "= ... Needs the plc extra."),
        click.option("--modbus-allow", "modbus_allow", metavar="ADDRESSES", default=None,
                     help="Clients the Modbus server admits: IP addresses or networks, comma-separated "
                          "(10.0.0.5,10.0.1.0/24); others are disconnected unread. Required when --modbus listens "
                          "beyond this machine unless Modbus/TCP Security is on: plain Modbus TCP has no "
                          "authentication, the client's address is all a server can check. Line file: [plc] "
                          "modbus_allow = ..."),
        click.option("--modbus-certificate", "modbus_certificate", type=click.Path(exists=True, dir_okay=False),
                     default=None,
                     help="Server certificate (PEM) for Modbus/TCP Security: with --modbus-private-key and "
                          "--modbus-trust the server speaks only TLS 1.2+ (the same MBAP frames; port 802 is "
                          "registered for it) and admits only clients presenting a certificate the trust folder "
                          "admits. SIGHUP reads it and its key again (a renewal without a restart; a pair that "
                          "does not load is refused and the old one stays). Line file: [plc] modbus_certificate = ..."),
        click.option("--modbus-private-key", "modbus_private_key", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="The --modbus-certificate's private key (PEM, unencrypted)."),
        click.option("--modbus-trust", "modbus_trust", metavar="DIR", type=click.Path(exists=True, file_okay=False),
                     default=None,
                     help="Folder of the client (PLC) certificates Modbus/TCP Security admits: the same layout and "
                          "rules as --opcua-trust (listed certificates, authorities with their CRLs, intermediates "
                          "in DIR/issuers; read again when a file changes). Line file: [plc] modbus_trust = ..."),
        click.option("--modbus-write-roles", "modbus_write_roles", metavar="ROLES", default=None,
                     help="With Modbus/TCP Security: only clients whose certificate carries one of these roles "
                          "(comma-separated; the Modbus role extension, OID 1.3.6.1.4.1.50316.802.1) may write, "
                          "so trigger; other admitted clients may read, their writes answered with exception 01. "
                          "Default: every admitted client may write. Line file: [plc] modbus_write_roles = ..."),
        click.option("--plc-results-buffer", "plc_results_buffer", type=IntegerRange(1, 64), default=None,
                     help=f"Results held for the PLC until acknowledged, the presented one included (default "
                          f"{RESULTS_BUFFER}); newer ones are dropped and flagged as overrun."),
        click.option("--opcua", "opcua", metavar="opc.tcp://HOST:PORT", default=None,
                     help="Serve an OPC UA VisionSystem after OPC 40100-1 (Machine Vision): StartSingleJob and "
                          "friends, ResultReady events (docs/PLC.md). A trigger source for --trigger software/hardware. "
                          "Default bind 127.0.0.1. Line file: [plc] opcua = ... Needs the plc extra."),
        click.option("--opcua-user", default=None, help="OPC UA user name allowed to call methods (with "
                                                         "--opcua-password-env)."),
        click.option("--opcua-password-env", metavar="VAR", default=None,
                     help="Environment variable holding the OPC UA user's password (never on the command line)."),
        click.option("--opcua-anonymous-calls", is_flag=True, default=None,
                     help="Let anonymous OPC UA clients call methods too (default: they may only browse, read and "
                          "subscribe)."),
        click.option("--opcua-certificate", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Server certificate (DER or PEM, its application URI in the subject alternative names): "
                          "with --opcua-private-key the only endpoint is Basic256Sha256 Sign&Encrypt. SIGHUP reads "
                          "both again (a renewal with the same application URI; one that does not load or match is "
                          "refused and the old one stays)."),
        click.option("--opcua-private-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="The server certificate's private key (PEM)."),
        click.option("--opcua-trust", metavar="DIR", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Folder of trusted OPC UA client certificates and certificate authorities with their "
                          "CRLs (DER or PEM; .crl), intermediate authorities in DIR/issuers: with "
                          "--opcua-certificate, a client whose certificate is neither there nor issued through a "
                          "chain to an authority there (none revoked, no CRL past its nextUpdate) is refused. Read "
                          "again when a file changes (a new CRL needs no restart). Line file: [plc] "
                          "opcua_trust = ..."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pop_plc_settings(options: dict, line_file_settings: Optional[PlcSettings] = None) -> PlcSettings:
    """PlcSettings from (and taken out of) run_command's options, over the line file's ``[plc]``."""
    base = line_file_settings or PlcSettings()
    given = {"modbus": options.pop("modbus"), "modbus_allow": options.pop("modbus_allow", None),
             "results_buffer": options.pop("plc_results_buffer"),
             "opcua": options.pop("opcua"), "opcua_user": options.pop("opcua_user"),
             "opcua_password_env": options.pop("opcua_password_env"),
             "opcua_anonymous_calls": options.pop("opcua_anonymous_calls"),
             "opcua_certificate": options.pop("opcua_certificate"),
             "opcua_private_key": options.pop("opcua_private_key"),
             "opcua_trust": options.pop("opcua_trust", None),
             "modbus_certificate": options.pop("modbus_certificate", None),
             "modbus_private_key": options.pop("modbus_private_key", None),
             "modbus_trust": options.pop("modbus_trust", None),
             "modbus_write_roles": options.pop("modbus_write_roles", None)}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None}).check("--")


def opcua_exposure(settings: PlcSettings) -> Optional[str]:
    """What an OPC UA server that anyone beyond this machine may read should tell the operator (None when
    it listens on loopback or admits trusted clients only). Anonymous sessions browse, read and subscribe
    (only calls need the user), so whoever reaches it reads every result, as on the operator page
    (--http beyond this machine says so too)."""
    from mrkd.runtime.addresses import is_loopback_host
    from mrkd.runtime.plc.opcua import parse_opcua_url
    host, _ = parse_opcua_url(settings.opcua)
    if is_loopback_host(host) or settings.opcua_trust is not None:
        return None
    return (f"OPC UA server {settings.opcua} listens beyond this machine: whoever reaches it reads every part's "
            f"result and the line's state (anonymous sessions may browse, read and subscribe)"
            f"{'' if settings.opcua_certificate else ', unencrypted'}; admit known clients only (--opcua-trust with "
            f"--opcua-certificate, or [plc] opcua_trust) or listen on 127.0.0.1")


def start_plc_servers(target, settings: PlcSettings, echo=None) -> List:
    """Start the servers ``settings`` asks for on ``target`` (the part runner); returns them as line
    observers (add them to the runner's before it starts). PlcError names one that cannot listen;
    the ones already started are closed again."""
    servers: List = []
    try:
        if settings.modbus is not None:
            from mrkd.runtime.plc.modbus import ModbusPlc, parse_client_networks, parse_modbus_address
            host, port = parse_modbus_address(settings.modbus)
            from mrkd.runtime.plc.modbus_security import ModbusSecurity, parse_roles
            allow = parse_client_networks(settings.modbus_allow) if settings.modbus_allow is not None else None
            roles = parse_roles(settings.modbus_write_roles) if settings.modbus_write_roles is not None else None
            security = ModbusSecurity(settings.modbus_certificate, settings.modbus_private_key, settings.modbus_trust,
                                      roles) if settings.modbus_trust is not None else None
            server = ModbusPlc(target, host, port, capacity=settings.results_buffer, allow=allow,
                               security=security).start()
            servers.append(server)
            if echo:
                clients = f"; clients from {settings.modbus_allow}" if allow is not None else ""
                if security is not None:
                    clients += f"; Modbus/TCP Security, client certificates trusted from {settings.modbus_trust}"
                    if roles is not None:
                        clients += f", writes by roles {', '.join(sorted(roles))} only"
                echo(f"Modbus TCP PLC server on {server.address[0]}:{server.address[1]} (map: docs/PLC.md{clients})")
        if settings.opcua is not None:
            from mrkd.runtime.plc.opcua import OpcUaPlc
            server = OpcUaPlc(target, settings.opcua, user=settings.opcua_user, password=settings.opcua_password(),
                              anonymous_calls=settings.opcua_anonymous_calls, certificate=settings.opcua_certificate,
                              private_key=settings.opcua_private_key, trust=settings.opcua_trust).start()
            servers.append(server)
            if echo:
                calls = ("user " + settings.opcua_user if settings.opcua_user else "nobody") + \
                    (" and anonymous clients" if settings.opcua_anonymous_calls else "")
                security = "Basic256Sha256 Sign&Encrypt" if settings.opcua_certificate else "no encryption"
                if settings.opcua_trust:
                    security += f", clients trusted from {settings.opcua_trust}"
                echo(f"OPC UA VisionSystem on {server.url} ({security}; methods: {calls})")
                exposure = opcua_exposure(settings)
                if exposure is not None:
                    echo(warning_line(exposure))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers

