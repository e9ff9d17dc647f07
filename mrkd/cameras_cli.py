"""``mrkd cameras``: the GenICam cameras Aravis finds now (GigE Vision on every network interface,
USB3 Vision), each with the ``gige://`` URI that opens it in ``mrkd run --source``."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from mrkd.errors import error_boundary


@click.command("cameras", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON (one object per camera).")
@error_boundary
def cameras_command(as_json):
    """List the GigE Vision cameras on the network (through Aravis: apt install gir1.2-aravis-0.8)."""
    from mrkd.runtime.sources.gige import list_cameras

    cameras = list_cameras()
    if as_json:
        click.echo(json.dumps([asdict(c) | {"uri": c.uri} for c in cameras], indent=2))
        return
    if not cameras:
        click.echo("no GenICam camera found (GigE Vision cameras answer on each interface's broadcast; "
                   "check the cable, the camera's IP address and the firewall on UDP 3956)", err=True)
        return
    click.echo(f"{'uri':28} {'serial':16} {'vendor':16} {'model':20} {'protocol':12} device id")
    for c in cameras:
        uri = c.uri if c.protocol == "GigEVision" else f"gige://{c.device_id}"
        click.echo(f"{uri:28} {c.serial:16} {c.vendor:16} {c.model:20} {c.protocol:12} {c.device_id}")
