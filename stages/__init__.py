import os

# Under flows/ (LONGLIVE_LOG_FORMAT=json) a stage process logs as JSON lines from its first import on, so the
# warnings third-party packages log while being imported keep their level too (stages/_common.py).
if os.environ.get("LONGLIVE_LOG_FORMAT") == "json":
    from stages._common import configure_logging

    configure_logging()
