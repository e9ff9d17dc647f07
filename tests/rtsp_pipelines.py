"""What tests/rtsp_server.py serves per codec, and exactly which GStreamer elements and Debian packages that takes
(and the Debian package of every other element a test's pipeline names: test_video_off_loop's AVI reader).

Imports nothing, so both the server (Debian's Python, python3-gi) and tests/peers.py (the venv, pytest) read the
same pipelines: the check before a test looks for the elements the test's server will really build.
"""

ENCODERS = {
    "mjpeg": "jpegenc quality=90 ! rtpjpegpay name=pay0 pt=26",
    "h264": "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 "
            "config-interval=1",
}

# The elements GStreamer's RTSP server makes itself around every launch line, seen with
# GST_DEBUG=GST_ELEMENT_FACTORY:5 while FFmpeg played it over UDP and over TCP (tests/test_peer_checks.py
# watches this list): the RTP session (rtpmanager), UDP sockets (udp), the TCP path (app) and core ones.
SERVER_ELEMENTS = ("bin", "pipeline", "capsfilter", "tee", "funnel", "rtpbin", "rtpsession", "rtpssrcdemux",
                   "rtpstorage", "udpsrc", "multiudpsink", "appsrc", "appsink")

# The Debian package of every element above and in the launch lines below (videotestsrc/videoconvert/appsrc/
# appsink: base; jpegenc/rtp*pay/rtpbin/udp*: good; x264enc: ugly; bin/capsfilter/tee/funnel: GStreamer's core),
# and of the AVI reader's (filesrc: core; avidemux/jpegdec: good).
ELEMENT_PACKAGES = {
    "bin": "libgstreamer1.0-0",
    "filesrc": "libgstreamer1.0-0",
    "pipeline": "libgstreamer1.0-0",
    "capsfilter": "libgstreamer1.0-0",
    "tee": "libgstreamer1.0-0",
    "funnel": "libgstreamer1.0-0",
    "rtpbin": "gstreamer1.0-plugins-good",
    "rtpsession": "gstreamer1.0-plugins-good",
    "rtpssrcdemux": "gstreamer1.0-plugins-good",
    "rtpstorage": "gstreamer1.0-plugins-good",
    "udpsrc": "gstreamer1.0-plugins-good",
    "multiudpsink": "gstreamer1.0-plugins-good",
    "appsrc": "gstreamer1.0-plugins-base",
    "appsink": "gstreamer1.0-plugins-base",
    "videotestsrc": "gstreamer1.0-plugins-base",
    "videoconvert": "gstreamer1.0-plugins-base",
    "jpegenc": "gstreamer1.0-plugins-good",
    "rtpjpegpay": "gstreamer1.0-plugins-good",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "avidemux": "gstreamer1.0-plugins-good",
    "jpegdec": "gstreamer1.0-plugins-good",
}


def launch_line(codec: str, fps: int = 10, width: int = 160, height: int = 120) -> str:
    # videotestsrc's "ball": a white ball moving on black, which the tests' bright-patch model flags.
    return (f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! videoconvert ! video/x-raw,format=I420 ! {ENCODERS[codec]} )")


def launch_elements(line: str) -> tuple:
    """The element factory names a launch line makes, in order: each stage's first word, and capsfilter for a
    caps string ("video/x-raw,format=GRAY8")."""
    names = [stage.split()[0] for stage in line.strip("() ").split("!")]
    return tuple(dict.fromkeys("capsfilter" if "/" in name else name for name in names))


def elements(codec: str) -> tuple:
    """The element factory names a server of ``codec`` builds: its launch line's and the RTSP server's own."""
    return tuple(dict.fromkeys(SERVER_ELEMENTS + launch_elements(launch_line(codec))))

