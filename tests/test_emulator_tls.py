"""The emulator over HTTPS: a self-signed CA clients must trust explicitly."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import PluginStub

HEALTH = "/ums/system/healthCheck"


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


def tls_emulator(keys: list[rsa.RSAPrivateKey], tls_dir: str | None) -> Emulator:
    config = EmulatorConfig(tls=True, tls_dir=tls_dir, seed_patients=0)
    return Emulator(config, key_factory=cycling_factory(keys))


@pytest.fixture
async def server(
    keys: list[rsa.RSAPrivateKey], tmp_path: Path
) -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(tls_emulator(keys, str(tmp_path / "tls"))) as srv:
        yield srv


def trusting(ca_file: str) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=ca_file)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


async def test_https_with_the_ca_bundle(server: EmulatorServer, tmp_path: Path) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    assert server.ca_file == str(tmp_path / "tls" / "ca.pem")
    async with trusting(server.ca_file) as http, http.get(server.url + HEALTH) as response:
        assert response.status == 200
    key_mode = (await asyncio.to_thread(os.stat, tmp_path / "tls" / "server-key.pem")).st_mode
    assert key_mode & 0o777 == 0o600


async def test_https_refused_without_the_ca_bundle(server: EmulatorServer) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(server.url + HEALTH)


async def test_localhost_name_is_valid_too(keys: list[rsa.RSAPrivateKey], tmp_path: Path) -> None:
    emulator = tls_emulator(keys, str(tmp_path))
    async with EmulatorServer(emulator, host="localhost") as srv:
        assert srv.url.startswith("https://localhost:")
        assert srv.ca_file is not None
        async with trusting(srv.ca_file) as http, http.get(srv.url + HEALTH) as response:
            assert response.status == 200


async def test_certificates_are_reused_from_tls_dir(
    keys: list[rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    async with EmulatorServer(tls_emulator(keys, str(tmp_path))) as first:
        assert first.ca_file is not None
        ca = await asyncio.to_thread(Path(first.ca_file).read_bytes)
    async with EmulatorServer(tls_emulator(keys, str(tmp_path))) as second:
        assert second.ca_file is not None
        assert await asyncio.to_thread(Path(second.ca_file).read_bytes) == ca


async def test_temporary_tls_dir_is_removed(keys: list[rsa.RSAPrivateKey]) -> None:
    async with EmulatorServer(tls_emulator(keys, None)) as srv:
        assert srv.ca_file is not None
        ca_file = srv.ca_file
        assert await asyncio.to_thread(os.path.exists, ca_file)
    assert not await asyncio.to_thread(os.path.exists, os.path.dirname(ca_file))


async def test_hooks_still_reach_plain_http_plugins(keys: list[rsa.RSAPrivateKey]) -> None:
    emulator = tls_emulator(keys, None)
    async with PluginStub() as plugin, EmulatorServer(emulator) as srv:
        assert srv.ca_file is not None
        emulator.subscribe_notification("patient", "_create", plugin.url("/notify"))
        token = emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL")
        body = {"_name": {"firstName": "T", "lastName": "LS"}}
        headers = {"authorization": f"Bearer {token}"}
        async with trusting(srv.ca_file) as http, http.post(
            srv.url + "/organization/v1/users/patients", json=body, headers=headers
        ) as response:
            assert response.status == 201
        await emulator.drain_notifications()
    assert [call.hooktype for call in plugin.calls] == ["NOTIFICATION"]
