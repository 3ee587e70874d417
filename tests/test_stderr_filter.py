"""The program's stderr filter: decoder messages dropped, everything else kept."""

import os
import subprocess
import sys

from lungcbir.stderr_filter import is_decoder_noise


def test_decoder_messages_are_noise_and_the_programs_lines_are_not():
    for line in ("libpng error: IDAT: invalid code lengths set", "Corrupt JPEG data: premature end of data segment",
                 "Premature end of JPEG file", "TIFFReadDirectory: Warning, Unknown field with tag 292",
                 "[ERROR:0@0.032] global loadsave.cpp:1377 imdecode_ imdecode_(''): can't read header"):
        assert is_decoder_noise(line), line
    for line in ("failed: /x/crc.png: not a decodable image", "error: no images found in /x",
                 "INFO:     127.0.0.1:5 - \"GET /healthz HTTP/1.1\" 200 OK", "Traceback (most recent call last):"):
        assert not is_decoder_noise(line), line


def test_the_filter_keeps_every_other_line_of_every_thread():
    """Lines of other threads written while decoders complain all arrive, in order (the old
    redirect of descriptor 2 to /dev/null lost the lines written meanwhile)."""
    code = (
        "import os, threading\n"
        "from lungcbir.stderr_filter import install\n"
        "install()\n"
        "def noise():\n"
        "    for _ in range(200):\n"
        "        os.write(2, b'libpng warning: iCCP: known incorrect sRGB profile\\n')\n"
        "        os.write(2, b'[ WARN:0@1.0] global grfmt_tiff.cpp x\\n\\n')\n"
        "thread = threading.Thread(target=noise)\n"
        "thread.start()\n"
        "for number in range(200):\n"
        "    os.write(2, f'line {number}\\n'.encode())\n"
        "thread.join()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"line {number}" for number in range(200)]
