"""Streaming long-video inference: rolling KV cache with sinks (``cache``), prompt schedules
(``schedule``), the chunk loop (``pipeline``), decoding and mp4 output (``writer``), and the
``longlive generate`` entry point (``generate``)."""
