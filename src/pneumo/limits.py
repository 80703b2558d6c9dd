"""The limits on outside input, stated once: every reader checks them before doing the work.

A DICOM header is checked against MAX_IMAGE_PIXELS before any pixel is decoded, so a tiny file
that declares a huge image (a decompression bomb) costs a header read, not gigabytes. serve
stops reading a request body at its byte cap, whatever Content-Length says, and decodes at most
MAX_CONCURRENT_DECODES uploads at a time, so its memory stays bounded under any load.
"""

# The largest chest detectors are about 43 cm at 0.1 mm pixels (4300 x 4300 = 18.5 MP); RSNA
# files are 1024 x 1024. 40 MP (6300 x 6300) leaves room and bounds one decode: 80 MB of
# 16-bit pixels, about 0.5 GB while mapping grey levels.
MAX_IMAGE_PIXELS = 40_000_000

# One uploaded DICOM file (a 1024 x 1024 x 16-bit CR is 2 MB; large detectors up to ~40 MB).
MAX_UPLOAD_BYTES = 64 * 1024 * 1024

# Request bodies: a multipart form adds headers and boundaries to the file; base64 in JSON
# takes 4 bytes per 3.
MAX_MULTIPART_BODY_BYTES = MAX_UPLOAD_BYTES + 1024 * 1024
MAX_JSON_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 1024 * 1024

# Uploads decoded at once by serve (each up to MAX_IMAGE_PIXELS); further requests wait.
MAX_CONCURRENT_DECODES = 2

# HTTP connections serve handles at once (uvicorn answers 503 beyond): with the body caps above
# this bounds the memory held in request bodies.
MAX_CONNECTIONS = 32

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
