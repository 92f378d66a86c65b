"""media-proxy: serves Synapse's media from a managed local cache backed by S3."""

__version__ = "0.1.0"
