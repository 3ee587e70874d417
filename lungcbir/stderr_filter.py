"""What the ``lungcbir`` program does about decoder noise on stderr (the program, not the library).

C decoders (libpng, libjpeg, libtiff) and OpenCV's log write warnings about a broken file
straight to file descriptor 2, where the command line already reports that file in one line.
The library leaves the process's stderr alone (it is shared with whoever embeds it); the
program, which owns its process, routes descriptor 2 through a pipe once at start-up and a
thread forwards every line except those known decoder messages. Nothing is serialised and
no other thread's output is lost: lines are filtered, not silenced. Reader processes started
by the program inherit the pipe, so their noise is filtered too.

Example:
    >>> is_decoder_noise("libpng warning: iCCP: known incorrect sRGB profile")
    True
    >>> is_decoder_noise("failed: scan.png: not a decodable image")
    False
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

#: Lines C decoders and OpenCV print about a file the program reports on its own.
DECODER_NOISE = re.compile(
    r"^(libpng (warning|error)|Corrupt JPEG data|Premature end of JPEG|Invalid SOS parameters|"
    r"JPEG datastream contains no image|Bogus marker length|Unsupported marker type|"
    r"Not a JPEG file|Wrong JPEG library version|Quantization table 0x|"
    r"(TIFF|_TIFF)\w*: |\w+: (Not a TIFF|Cannot read TIFF|Can not read TIFF|Sorry, requested compression)|"
    r"\[ ?(WARN|ERROR|INFO):\d*@?[\d.]*\] global )")


def is_decoder_noise(line: str) -> bool:
    """Whether ``line`` is a decoder's message about a file (dropped), not the program's (kept)."""
    return DECODER_NOISE.match(line) is not None


def install() -> None:
    """Route this process's descriptor 2 through the noise filter, until it exits."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return  # no usable stderr (a daemon): nothing to filter
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, real), name="stderr-filter", daemon=True)
    forwarder.start()

    def drain() -> None:  # at exit: close our end of the pipe so the forwarder sees its end
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)
        forwarder.join(timeout=5)

    atexit.register(drain)


def _forward(read_end: int, real: int) -> None:
    pending, after_noise = b"", False
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            after_noise = _write(real, lines, after_noise)
    if pending:
        _write(real, [pending], after_noise)


def _write(real: int, lines: list[bytes], after_noise: bool) -> bool:
    """Write the lines that are not noise; returns whether the last line was noise (OpenCV ends
    its messages with an empty line, dropped with them)."""
    kept = []
    for line in lines:
        text = line.decode("utf-8", "replace")
        noise = is_decoder_noise(text) or (after_noise and not text.strip())
        if not noise:
            kept.append(line + b"\n")
        after_noise = noise
    data = b"".join(kept)
    while data:
        data = data[os.write(real, data):]
    return after_noise
