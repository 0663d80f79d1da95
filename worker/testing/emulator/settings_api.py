"""BioT's settings service over HTTP: the plugin deployment API and the interceptable APIs.

``POST /settings/v2/plugins`` (multipart: ``config`` JSON and ``code`` zip) answers 201 with the
plugin; ``GET``/``PATCH``/``DELETE /settings/v2/plugins/{name}`` get it, update it partially
(multipart too; new code needs a larger ``version``) or delete it (204);
``GET /settings/v2/plugins`` and ``GET /settings/v1/interceptions`` are BioT searches
(``searchRequest``), the latter over ``{entityTypeName, servicePrefix, apiId}`` of every API the
emulator serves. Each needs a token holding the permission BioT's settings spec names (the admin
user's login token holds them all). What a change does is up to
:mod:`~worker.testing.emulator.deployments`.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import BodyPartReader, web

from worker.testing.emulator.deployments import MAX_CODE_BYTES, Deployments
from worker.testing.emulator.middleware import require_caller
from worker.testing.emulator.plugin_config import invalid
from worker.testing.emulator.routes import interception_configs
from worker.testing.emulator.search import parse_search_request, search, search_response
from worker.testing.emulator.wire import json_response, loads

PLUGINS: Final = "/settings/v2/plugins"
INTERCEPTIONS: Final = "/settings/v1/interceptions"
MAX_CONFIG_BYTES: Final = 1024 * 1024


class SettingsApi:
    def __init__(self, deployments: Deployments) -> None:
        self._deployments = deployments

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(PLUGINS, self.create),
            web.get(PLUGINS, self.search_plugins),
            web.get(PLUGINS + "/{name}", self.get),
            web.patch(PLUGINS + "/{name}", self.update),
            web.delete(PLUGINS + "/{name}", self.delete),
            web.get(INTERCEPTIONS, self.interceptions),
        ]

    async def create(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_PLUGIN_CREATE")
        config, code = await _form(request)
        deployment = await self._deployments.create(config, code)
        return json_response(deployment.to_json(), 201)

    async def get(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_PLUGIN_GET")
        return json_response(self._deployments.get(request.match_info["name"]).to_json())

    async def update(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_PLUGIN_UPDATE")
        name = request.match_info["name"]
        self._deployments.get(name)  # 404 before reading an upload
        config, code = await _form(request)
        return json_response((await self._deployments.update(name, config, code)).to_json())

    async def delete(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_PLUGIN_DELETE")
        await self._deployments.delete(request.match_info["name"])
        return json_response(None, 204)

    async def search_plugins(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_PLUGIN_SEARCH")
        items = [deployment.to_json() for deployment in self._deployments.all()]
        return _search(request, items, "creationTime")

    async def interceptions(self, request: web.Request) -> web.Response:
        require_caller(request, "SETTINGS_SEARCH_INTERCEPTION_SUBSCRIPTION_CONFIGURATIONS")
        return _search(request, interception_configs(), "creationTime")


def _search(request: web.Request, items: list[dict[str, Any]], sort: str) -> web.Response:
    search_request = parse_search_request(request.query.get("searchRequest"))
    page, total = search(items, search_request, default_sort=sort)
    return json_response(search_response(page, total, search_request))


async def _form(request: web.Request) -> tuple[Any, bytes | None]:
    """The ``config`` part (parsed JSON) and the ``code`` part (``None`` when not sent)."""
    if not request.content_type.startswith("multipart/"):
        raise invalid("expected multipart/form-data with a `config` part (and a `code` zip)")
    reader = await request.multipart()
    parts: dict[str, bytes] = {}
    async for part in reader:
        if not isinstance(part, BodyPartReader) or part.name not in ("config", "code"):
            name = getattr(part, "name", None)
            raise invalid(f"unexpected multipart part {name!r}: want `config` and `code`")
        limit = MAX_CODE_BYTES if part.name == "code" else MAX_CONFIG_BYTES
        parts[part.name] = await _read(part, limit)
    if "config" not in parts:
        raise invalid("the multipart part `config` (the plugin's JSON configuration) is missing")
    try:
        config = loads(parts["config"])
    except ValueError as exc:
        raise invalid("the `config` part is not JSON") from exc
    code = parts.get("code")
    if code is not None and not code:
        raise invalid("the `code` part is empty")
    return config, code


async def _read(part: BodyPartReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise invalid(f"the `{part.name}` part is larger than {limit // (1024 * 1024)} MiB")
        chunks.append(chunk)
    return b"".join(chunks)
