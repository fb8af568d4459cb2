"""Where a stage reads the training clips: ``synth``'s, or ``ingest``'s when ``data.source`` names the user's
videos (the same format). Real presets leave ``data.source`` empty until the user sets it; a stage that needs
clips then stops with one line naming the key."""

import sys
from pathlib import Path

from longlive.config import ConfigError, Preset

SYNTH, INGEST = Path("data/synth"), Path("data/ingest")


def clips_dir(preset: Preset, stage: str) -> Path:
    try:
        preset.data.require_source(preset.name)
    except ConfigError as e:
        sys.exit(f"{stage}: {e}")
    return SYNTH if preset.data.is_synth else INGEST
