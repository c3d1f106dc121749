#!/usr/bin/python3
"""A loopback RTSP server that plays a video file in an endless loop (test fixture, H.264 over RTP).

Run with Debian's python3, which has the GStreamer bindings (``python3-gi``, ``gir1.2-gst-rtsp-server-1.0``,
``gstreamer1.0-plugins-{base,good,bad,ugly}``, ``gstreamer1.0-libav``):

    /usr/bin/python3 tests/gst_rtsp_server.py VIDEO --port 8554 --mount /stream

Prints ``READY rtsp://127.0.0.1:PORT/MOUNT`` once it listens. Every client gets its own pipeline starting at the
first frame: a reader pipeline decodes the file into an appsink; its frames are re-stamped onto one continuous
timeline (the file's length is added at each loop) and pushed into the served pipeline's appsrc, which encodes
them with x264 (zerolatency, one key frame per second) and sends them in real time.
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstApp, GstRtspServer  # noqa: E402

_PULL_TIMEOUT_NS = 5 * Gst.SECOND


class LoopingFile:
    """Decodes ``path`` to raw I420 frames, again from the start after each end, on one increasing timeline."""

    def __init__(self, path: str, width: int, fps: int) -> None:
        scale = f"videoscale ! video/x-raw,width={width},pixel-aspect-ratio=1/1 ! " if width > 0 else ""
        rate = f"videorate ! video/x-raw,framerate={fps}/1 ! " if fps > 0 else ""
        self.pipeline = Gst.parse_launch(
            f'filesrc location="{path}" ! decodebin ! videoconvert ! {scale}{rate}'
            "videoconvert ! video/x-raw,format=I420 ! appsink name=sink sync=false max-buffers=8"
        )
        self.sink: GstApp.AppSink = self.pipeline.get_by_name("sink")
        self.offset = 0  # ns added to the file's timestamps (whole loops played so far)
        self.last_end = 0  # ns: end of the last frame handed out, on the continuous timeline
        self.pipeline.set_state(Gst.State.PLAYING)

    def next_sample(self) -> Gst.Sample | None:
        """The next decoded frame (looping at the end of the file); ``None`` if the file yields nothing."""
        for _ in range(2):
            sample = self.sink.try_pull_sample(_PULL_TIMEOUT_NS)
            if sample is not None:
                return sample
            if not self.sink.is_eos():
                return None
            self.offset = self.last_end  # next loop starts where this one ended
            self.pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0)
        return None

    def restamp(self, sample: Gst.Sample) -> Gst.Buffer:
        """A copy of the sample's buffer with its time moved onto the continuous timeline."""
        buffer = sample.get_buffer().copy()
        duration = buffer.duration if buffer.duration != Gst.CLOCK_TIME_NONE else Gst.SECOND // 30
        buffer.pts = self.offset + buffer.pts
        buffer.dts = Gst.CLOCK_TIME_NONE
        buffer.duration = duration
        self.last_end = max(self.last_end, buffer.pts + duration)
        return buffer

    def stop(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)


class LoopFactory(GstRtspServer.RTSPMediaFactory):
    """One looping reader per client, feeding ``appsrc ! x264enc ! rtph264pay``."""

    def __init__(self, path: str, width: int, fps: int) -> None:
        super().__init__()
        self.path, self.width, self.fps = path, width, fps
        self.set_launch(
            "( appsrc name=src format=time is-live=false ! videoconvert ! "
            "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bframes=0 ! "
            "rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        self.set_shared(False)
        self.connect("media-configure", self._configure)

    def _configure(self, _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        src: GstApp.AppSrc = media.get_element().get_child_by_name("src")
        reader = LoopingFile(self.path, self.width, self.fps)
        first = reader.next_sample()
        if first is None:
            print(f"cannot decode {self.path}", file=sys.stderr, flush=True)
            return
        src.set_caps(first.get_caps())
        pending = [first]

        def need_data(appsrc: GstApp.AppSrc, _length: int) -> None:
            sample = pending.pop() if pending else reader.next_sample()
            if sample is None:
                appsrc.end_of_stream()
                return
            appsrc.push_buffer(reader.restamp(sample))

        src.connect("need-data", need_data)
        media.connect("unprepared", lambda *_: reader.stop())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", help="video file to serve in a loop")
    parser.add_argument("--port", type=int, default=8554, help="TCP port (0 = any free port)")
    parser.add_argument("--mount", default="/stream", help="URL path of the stream")
    parser.add_argument("--width", type=int, default=0, help="scale to this width (0 = keep)")
    parser.add_argument("--fps", type=int, default=0, help="resample to this rate (0 = keep)")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.mount, LoopFactory(args.video, args.width, args.fps))
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 2
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}{args.mount}", flush=True)
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
