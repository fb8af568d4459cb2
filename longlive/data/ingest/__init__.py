"""``ingest``: a user's own videos and captions -> clips in the format ``encode`` reads (see ``engine``).

Modules, bottom up: ``filters`` (reasons a file or clip is left out), ``clips`` (settings, clip windows and
shots), ``decode`` (PyAV: probe, seek, resample, resize + crop; PySceneDetect cuts), ``sources`` (folders,
buckets, manifests, sidecars, webdataset tars), ``engine`` (Ray Data, cache, index, report).
"""

from longlive.data.ingest.clips import IngestSettings
from longlive.data.ingest.engine import run_ingest
from longlive.data.ingest.filters import REASONS
from longlive.data.ingest.sources import IngestError

__all__ = ["REASONS", "IngestError", "IngestSettings", "run_ingest"]
