"""Every size budget in one place (README, "Limits"). A size that a file, a config or a command declares is checked
against these before anything is allocated for it, in every command that reads it (train, predict, evaluate,
serve, data inspect, cells extract, slides tile, predict --slide, grid).

The budgets keep one process under about 1.5 GB however hostile its input: a decoder is never asked for more than
``MAX_PIXELS`` pixels, a compressed stream is never inflated past ``MAX_INFLATED_BYTES``, a YAML document never
expands past ``MAX_YAML_NODES`` and a user's regular expression never runs past ``REGEX_SECONDS``.
Nothing here imports another oncotransfer module: every layer may import it.
"""
from __future__ import annotations

MAX_PIXELS = 64_000_000
"""Pixels of one decoded image or frame (ingestion, ``predict``, ``serve``, cells, slide tiles): 64 megapixels
(8000 x 8000) holds every camera and microscope tile we know of, and the decode of a 64 MP PNG or TIFF peaks near
6 bytes a pixel (native decode + RGB copy) = 384 MB. Pillow's own bomb limit (89 MP warning, 179 MP error) lets
a 79 KB PNG of 9000 x 9000 px through at about 0.45 GB a request. ``ONCOTRANSFER_MAX_PIXELS`` overrides it for
ingestion (train, evaluate --data, data inspect), ``--max-pixels`` for predict and data inspect."""

MAX_FILE_BYTES = 4 * 2**30
"""Size on disk of one image, DICOM object or volume (whole-slide files are tiled, never read whole, and are
exempt): a larger file is refused from ``stat`` before a byte is read. 4 GiB holds a 2000-frame 1024 x 1024
cine loop; a sparse file of a terabyte named ``.png`` or ``.dcm`` is refused at once."""

MAX_INFLATED_BYTES = 128 * 2**20
"""Bytes a Deflated Explicit VR Little Endian DICOM object may inflate to. Such an object is inflated whole in
memory before any element can be read (the syntax allows no seeking), so this caps what one file or upload
costs: 128 MiB is two 64 MP 8-bit frames, where a 600 KB deflated object can otherwise inflate to 600 MB and
a 2.5 MB one to 2.5 GB."""

MAX_FRAMES = 100_000
"""Frames of one multi-frame DICOM object (a 30 fps cine loop of 55 minutes). The declared NumberOfFrames must
also fit the object's pixel data: an object declaring 10^9 frames in 4 KB is refused, not listed as 10^9 rows."""

MAX_HEADER_BYTES = 64 * 2**20
"""Bytes of DICOM data elements read before the pixel data (a header is kilobytes; large values are skipped,
not read)."""

MAX_HEADER_READS = 100_000
"""Reads of DICOM data elements before the pixel data: an enhanced multi-frame header of 1000 frames is about
50,000 elements, while a file of zeros parses as endless empty elements (a terabyte of them never ends)."""

MAX_TABLE_BYTES = 512 * 2**20
"""Size of a CSV a command reads whole (a manifest, a labels CSV): millions of rows."""

MAX_CONFIG_BYTES = 4 * 2**20
"""Size of a YAML config or grid file."""

MAX_YAML_NODES = 100_000
"""Nodes of a YAML document once its aliases are expanded: a "billion laughs" file of 30 lines expands to 10^9
nodes and never finishes loading."""

MAX_YAML_DEPTH = 100
"""Nesting depth of a YAML document (deeper input exhausts the parser's recursion)."""

MAX_GRID_RUNS = 10_000
"""Runs (cells x trials) of one grid: each is validated before any training, and 10^6 of them take minutes to
start nothing."""

MAX_HEAD_UNITS = 8192
"""Units of one hidden layer of a classifier head; ``MAX_HEAD_LAYERS`` layers at most. A 4096-feature base into
8192 units is 34 M parameters (0.5 GB with Adam's state); 10^8 units would allocate 0.5 TB."""

MAX_HEAD_LAYERS = 16

MAX_TILE_SIDE = 4096
"""Side of one slide tile (``slides tile``, ``predict --slide``): a tile is an image the model scores, and they
are read in batches (``TILE_BATCH_BYTES``); 16000 px would be a 256 MP tile, four times ``MAX_PIXELS``."""

TILE_BATCH_BYTES = 256 * 2**20
"""RGB bytes of one batch of slide tiles read for ``predict --slide``: large tiles come in smaller batches."""

REGEX_SECONDS = 5.0
"""Wall time a user's regular expression (``data.patient_regex``) may take over all file names: it runs in a
child process that is killed past this, since Python's backtracking engine cannot be interrupted and
``^(a+)+$`` on 60 characters would run for centuries."""

MAX_REGEX_CHARS = 1000
