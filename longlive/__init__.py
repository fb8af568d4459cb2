"""LongLive: real-time autoregressive long-video generation pipeline."""
__version__ = "0.1.0"
