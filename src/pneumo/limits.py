"""The limits on outside input, stated once: every reader checks them before doing the work.

A DICOM header is checked against MAX_IMAGE_PIXELS before any pixel is decoded, so a tiny file
that declares a huge image (a decompression bomb) costs a header read, not gigabytes. serve
stops reading a request body at its byte cap, whatever Content-Length says, holds at most
MAX_CONCURRENT_UPLOADS bodies and decodes at most MAX_CONCURRENT_DECODES uploads at a time, and
closes connections that do not send their request in time, so its memory stays bounded under
any load (SERVE_MEMORY_BYTES below) and no number of slow clients under MAX_CONNECTIONS holds it.
"""

# The largest chest detectors are about 43 cm at 0.1 mm pixels (4300 x 4300 = 18.5 MP); RSNA
# files are 1024 x 1024. 40 MP (6300 x 6300) leaves room and bounds one decode: 80 MB of
# 16-bit pixels, about 0.5 GB while mapping grey levels.
MAX_IMAGE_PIXELS = 40_000_000
DECODE_BYTES = 512 * 1024 * 1024  # that half gigabyte, as a figure for the bound below

# One uploaded DICOM file (a 1024 x 1024 x 16-bit CR is 2 MB; large detectors up to ~40 MB).
MAX_UPLOAD_BYTES = 64 * 1024 * 1024

# Request bodies: a multipart form adds headers and boundaries to the file; base64 in JSON
# takes 4 bytes per 3.
MAX_MULTIPART_BODY_BYTES = MAX_UPLOAD_BYTES + 1024 * 1024
MAX_JSON_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 1024 * 1024

# A JSON upload's fields besides dicom_base64 (filename): they are parsed as JSON, where a
# character can cost 4 bytes and nesting costs recursion, so they stay small.
MAX_JSON_FIELDS_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255

# Uploads decoded at once by serve (each up to MAX_IMAGE_PIXELS); further requests wait.
MAX_CONCURRENT_DECODES = 2

# /predict requests reading or holding an upload at once; further ones wait with their body
# unread (uvicorn stops reading a socket at 64 KiB, the rest waits in the kernel).
MAX_CONCURRENT_UPLOADS = 4

# Open HTTP connections: beyond it a new one is answered 503 and closed. Idle and slow ones
# cannot keep the slots: see the timeouts below.
MAX_CONNECTIONS = 128

# Request line and headers (uvicorn/h11 answers 400 beyond).
MAX_HEADER_BYTES = 16 * 1024

# How long a client may take. Its request line and headers must arrive within HEADER_TIMEOUT_S
# of connecting (or of its previous answer), else the connection is closed (408 when part of a
# request came); a body must arrive within BODY_TIMEOUT_S of serve starting to read it (answered
# 408): the largest multipart upload at 9 Mbit/s, the largest JSON one at 12.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
# On SIGTERM, requests in progress get this long to finish, and uploads still arriving half of
# it; then serve exits whatever the clients do.
GRACEFUL_SHUTDOWN_S = 10.0

# ?annotated=true draws on the image scaled down to at most this long a side, made while the
# decode is held: the full image never outlives its decode slot.
ANNOTATED_MAX_SIDE = 2048

# serve's memory beyond the process with its model loaded (B: 0.59 GB measured with a tiny
# model on CPU, most of it Python, torch and the web stack), from the limits above:
#   each connection: its header buffer and unread body, 1 MiB (MAX_HEADER_BYTES, uvicorn's
#     64 KiB before it pauses reading, one 256 KiB socket read; h11 may hold a copy of each);
#   each upload slot: a JSON body as read (its declared size, or up to 1.125 x for a chunked one
#     that declares none), then with either the DICOM bytes decoded from it once or a copy
#     without escaped slashes: 2.25 x MAX_JSON_BODY_BYTES (194 MiB) at most. A multipart upload
#     spools to disk and costs its 64 MiB; the annotated copy is 4 MiB;
#   each decode slot: DECODE_BYTES (the image, its grey-level mapping, the SR's header read).
# 128 x 1 MiB + 4 x 194 MiB + 2 x 512 MiB = 1.9 GiB over B (benchmarks/serve_load.py measures it).
PER_CONNECTION_BYTES = 1024 * 1024
PER_UPLOAD_BYTES = MAX_JSON_BODY_BYTES * 9 // 4
SERVE_MEMORY_BYTES = (
    MAX_CONNECTIONS * PER_CONNECTION_BYTES
    + MAX_CONCURRENT_UPLOADS * PER_UPLOAD_BYTES
    + MAX_CONCURRENT_DECODES * DECODE_BYTES
)

# A params file (train, sweep, marathon) or a -p value, counted as the data it stands for: YAML
# anchors let 600 bytes stand for 10^9 items ("billion laughs"), which cost nothing to load but
# everything to format or copy. Counted before any value is used; a real sweep file has < 500.
MAX_PARAMS_ITEMS = 20_000
MAX_PARAMS_DEPTH = 16

# Runs one sweep may hold (a list plus a grid's product, or a search's trials), checked before the
# grid is built: 7 keys x 10 values would otherwise be 10^7 runs, each checked before a word is said.
MAX_SWEEP_RUNS = 1_000
# Values a searched range with a step may take ((high - low) / step): a step of 1e-300 is refused.
MAX_SEARCH_STEPS = 1_000_000
