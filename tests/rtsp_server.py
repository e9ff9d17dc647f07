"""A real RTSP camera for the tests: GStreamer's RTSP server serving a generated picture on 127.0.0.1.

Runs under Debian's Python with python3-gi (tests/peers.py require_rtsp_server), not the project's
venv. Prints "READY rtsp://127.0.0.1:PORT/PATH" once it listens; serves until killed.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --codec mjpeg --fps 10 --size 160x120

The picture is videotestsrc's white ball moving on black (the tests' bright-patch model flags it), so
alarms come through the stream too. A shared media: every client sees the same live stream.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

from rtsp_pipelines import ENCODERS, launch_line  # noqa: E402  (this folder: the script's own)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="mjpeg")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--size", default="160x120")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args.codec, args.fps, width, height))
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    print(f"READY rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
