"""The media pipelines: one per kind of request, over shared steps (steps.py, rules.py).

`MediaPipeline.serve` picks the pipeline (local or remote, download or thumbnail); each
reads top to bottom as Synapse's order of decisions, parse -> authorize -> metadata ->
locate -> respond. Wherever the proxy cannot be sure of Synapse's exact answer a step
raises `PassThrough` and `serve` returns None: the server passes the request to Synapse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from media_proxy.authorize import Authorizer
from media_proxy.config import Config
from media_proxy.locate import Locator
from media_proxy.metadata import Metadata
from media_proxy.parse import Api, Kind, MediaRequest
from media_proxy.pipeline import federation, local, remote
from media_proxy.pipeline.steps import Env, Outcome, PassThrough, Undecided, deciding

__all__ = ["MediaPipeline", "Outcome"]

Pipeline = Callable[[Env, web.Request, MediaRequest, Outcome], Awaitable[web.StreamResponse]]

# (local?, kind) -> pipeline
_PIPELINES: Final[dict[tuple[bool, Kind], Pipeline]] = {
    (True, Kind.DOWNLOAD): local.download,
    (True, Kind.THUMBNAIL): local.thumbnail,
    (False, Kind.DOWNLOAD): remote.download,
    (False, Kind.THUMBNAIL): remote.thumbnail,
}


class MediaPipeline:
    def __init__(
        self, config: Config, authorizer: Authorizer, metadata: Metadata, locator: Locator
    ) -> None:
        self.config = config
        self.env = Env(config, authorizer, metadata, locator)

    async def serve(
        self, request: web.Request, media: MediaRequest, outcome: Outcome
    ) -> web.StreamResponse | None:
        """Synapse's answer to a download or thumbnail request, or None to pass it on."""
        if media.api is Api.FEDERATION:
            pipeline: Pipeline = federation.serve
        else:
            # Synapse's `is_mine_server_name`: exact, case-sensitive equality.
            pipeline = _PIPELINES[(media.server_name == self.config.server_name, media.kind)]
        try:
            return await pipeline(self.env, request, media, outcome)
        except PassThrough:
            if deciding(request):
                raise Undecided from None
            outcome.source = "synapse"
            return None
