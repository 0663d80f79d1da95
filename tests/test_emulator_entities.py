"""The emulator's entity APIs: CRUD with BioT's built-in attributes, search, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.testing.emulator import Emulator, EmulatorConfig, EmulatorServer
from worker.testing.emulator.entities import PATIENT, template_for
from worker.testing.emulator.keys import cycling_factory, generate_key
from worker.testing.emulator.testing import ManualClock

PATIENTS = "/organization/v1/users/patients"
CAREGIVERS = "/organization/v1/users/caregivers"
GENERIC = "/generic-entity/v1/generic-entities"
ERROR_KEYS = {"code", "message", "serviceName", "traceId", "environment", "details"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

PEOPLE = [
    # first, last, gender, born, score
    ("Zoe", "Adams", "FEMALE", "1990-01-15", 7),
    ("Yann", "Baker", "MALE", "1985-06-30", 3),
    ("Xena", "Clark", "FEMALE", "2001-11-02", 9),
    ("Walt", "Diaz", "MALE", "1979-03-12", None),
]


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [generate_key()]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emulator(keys: list[rsa.RSAPrivateKey], clock: ManualClock) -> Emulator:
    return Emulator(EmulatorConfig(seed_patients=0), clock=clock, key_factory=cycling_factory(keys))


class Api:
    """A service user's view of the emulator: JSON in, (status, JSON) out."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url = http, url
        self.headers = {"authorization": f"Bearer {token}", "traceparent": TRACEPARENT}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        async with self.http.request(
            method, self.url + path, data=data, headers=self.headers, params=params
        ) as response:
            text = await response.read()
            return response.status, orjson.loads(text) if text else None

    async def search(self, path: str, request: Any) -> tuple[int, Any]:
        raw = request if isinstance(request, str) else orjson.dumps(request).decode()
        return await self.call("GET", path, params={"searchRequest": raw})


@pytest.fixture
async def api(emulator: Emulator) -> AsyncIterator[Api]:
    async with EmulatorServer(emulator) as server, aiohttp.ClientSession() as http:
        yield Api(http, server.url, emulator.sign_token(scopes=[], token_type="SERVICE_EXTERNAL"))


async def create_people(api: Api, clock: ManualClock) -> dict[str, dict[str, Any]]:
    created: dict[str, dict[str, Any]] = {}
    for first, last, gender, born, score in PEOPLE:
        clock.advance(1)
        body: dict[str, Any] = {
            "_name": {"firstName": first, "lastName": last},
            "_email": f"{first.lower()}@example.com",
            "_gender": gender,
            "_dateOfBirth": born,
        }
        if score is not None:
            body["score"] = score
        status, entity = await api.call("POST", PATIENTS, body)
        assert status == 201, entity
        created[first] = entity
    return created


async def test_patient_crud_with_builtin_attributes(
    api: Api, emulator: Emulator, clock: ManualClock
) -> None:
    body = {"_name": {"firstName": "Ada", "lastName": "L"}, "_email": "ada@example.com", "x": 1}
    status, created = await api.call("POST", PATIENTS + "/templates/Clinic", body)
    assert status == 201
    assert created["_template"] == template_for(PATIENT, "Clinic")
    assert created["_ownerOrganization"] == {"id": emulator.config.organization_id}
    assert created["_caption"] == "Ada L"
    assert created["_creationTime"] == created["_lastModifiedTime"]
    assert created["_creationTime"].endswith("Z")
    assert created["x"] == 1
    assert created["_enabled"] == "ENABLED"

    status, fetched = await api.call("GET", f"{PATIENTS}/{created['_id']}")
    assert (status, fetched) == (200, created)

    clock.advance(5)
    patch = {"_name": {"firstName": "Ada", "lastName": "King"}, "_id": "hijack", "y": 2}
    status, updated = await api.call("PATCH", f"{PATIENTS}/{created['_id']}", patch)
    assert status == 200
    assert updated["_id"] == created["_id"]
    assert updated["_caption"] == "Ada King"
    assert (updated["x"], updated["y"]) == (1, 2)
    assert updated["_creationTime"] == created["_creationTime"]
    assert updated["_lastModifiedTime"] > created["_lastModifiedTime"]

    status, nothing = await api.call("DELETE", f"{PATIENTS}/{created['_id']}")
    assert (status, nothing) == (204, None)
    status, error = await api.call("GET", f"{PATIENTS}/{created['_id']}")
    assert status == 404
    assert set(error) == ERROR_KEYS
    assert error["code"] == "USER_NOT_FOUND"
    assert error["serviceName"] == "organization"
    assert error["traceId"] == TRACEPARENT.split("-")[1]


async def test_caregivers_and_generic_entities(api: Api) -> None:
    caregiver = {"_name": {"firstName": "Cy", "lastName": "G"}, "_email": "cy@example.com"}
    status, cg = await api.call("POST", CAREGIVERS + "/templates/Nurse", caregiver)
    assert status == 201
    assert cg["_template"]["name"] == "Nurse"
    assert (await api.call("GET", f"{CAREGIVERS}/{cg['_id']}"))[0] == 200

    status, entity = await api.call("POST", GENERIC + "/templates/device_log", {"_name": "log 1"})
    assert status == 201
    assert entity["_caption"] == "log 1"
    assert "_email" not in entity
    status, listed = await api.search(GENERIC, {"filter": {"_templateName": {"eq": "device_log"}}})
    assert [e["_id"] for e in listed["data"]] == [entity["_id"]]
    status, error = await api.call("DELETE", f"{GENERIC}/missing")
    assert (status, error["code"]) == (404, "GENERIC_ENTITY_NOT_FOUND")
    assert error["serviceName"] == "generic-entity"


async def test_create_by_template_id(api: Api) -> None:
    status, first = await api.call("POST", GENERIC + "/templates/kit", {"_name": "a"})
    assert status == 201
    body = {"_name": "b", "_templateId": first["_template"]["id"]}
    status, second = await api.call("POST", GENERIC, body)
    assert (status, second["_template"]) == (201, first["_template"])
    status, error = await api.call("POST", GENERIC, {"_name": "c", "_templateId": "unknown"})
    assert (status, error["code"]) == (404, "TEMPLATE_NOT_FOUND")


@pytest.mark.parametrize(
    ("path", "raw", "status", "code"),
    [
        (PATIENTS, b'{"_email": "a@b.c"}', 400, "ATTRIBUTE_IS_MANDATORY"),
        (PATIENTS, b'{"_name": {"firstName": "A"}}', 400, "ATTRIBUTE_IS_MANDATORY"),
        (GENERIC, b'{"_name": {"firstName": "A"}}', 400, "ATTRIBUTE_IS_MANDATORY"),
        (PATIENTS, b"[1, 2]", 400, "INVALID_REQUEST_BODY"),
        (PATIENTS, b"{not json", 400, "INVALID_REQUEST_BODY"),
        (PATIENTS + "/x/y", b"{}", 404, "NOT_FOUND"),
    ],
)
async def test_invalid_requests_answer_error_response(
    api: Api, path: str, raw: bytes, status: int, code: str
) -> None:
    got, error = await api.call("POST", path, raw=raw)
    assert (got, error["code"]) == (status, code)
    assert set(error) == ERROR_KEYS


async def test_duplicate_email_is_409(api: Api) -> None:
    body = {"_name": {"firstName": "A", "lastName": "B"}, "_email": "same@example.com"}
    assert (await api.call("POST", PATIENTS, body))[0] == 201
    status, error = await api.call("POST", PATIENTS, body)
    assert (status, error["code"]) == (409, "EMAIL_ALREADY_EXIST")


@pytest.mark.parametrize(
    ("filt", "expected"),
    [
        ({"_gender": {"eq": "FEMALE"}}, {"Zoe", "Xena"}),
        ({"_gender": {"not": "FEMALE"}}, {"Yann", "Walt"}),
        ({"_name.firstName": {"in": ["Zoe", "Walt", "Nobody"]}}, {"Zoe", "Walt"}),
        ({"_name.firstName": {"notIn": ["Zoe", "Walt"]}}, {"Yann", "Xena"}),
        ({"_name.lastName": {"like": "d"}}, {"Zoe", "Walt"}),
        ({"score": {"gt": 3}}, {"Zoe", "Xena"}),
        ({"score": {"gte": 3, "lt": 9}}, {"Zoe", "Yann"}),
        ({"score": {"lte": 7}}, {"Zoe", "Yann"}),
        ({"_dateOfBirth": {"from": "1985-01-01", "to": "1999-12-31"}}, {"Zoe", "Yann"}),
        ({"score": {"isNull": True}}, {"Walt"}),
        ({"score": {"isNotNull": True}}, {"Zoe", "Yann", "Xena"}),
        ({"_ownerOrganization.id": {"eq": "nope"}}, set()),
        ({"_templateName": {"eq": "Patient"}}, {"Zoe", "Yann", "Xena", "Walt"}),
        (
            {"$OR": {"filter": {"score": {"gt": 8}, "_gender": {"eq": "MALE"}}}},
            {"Xena", "Yann", "Walt"},
        ),
        ({"$NOT": {"filter": {"_gender": {"eq": "MALE"}}}}, {"Zoe", "Xena"}),
        ({"_gender": {"eq": "FEMALE"}, "score": {"gt": 8}}, {"Xena"}),
    ],
)
async def test_search_filters(
    api: Api, clock: ManualClock, filt: dict[str, Any], expected: set[str]
) -> None:
    await create_people(api, clock)
    status, found = await api.search(PATIENTS, {"filter": filt})
    assert status == 200
    assert {p["_name"]["firstName"] for p in found["data"]} == expected
    assert found["metadata"]["page"]["totalResults"] == len(expected)
    assert found["metadata"]["filter"] == filt


async def found(api: Api, request: Any) -> tuple[list[str], dict[str, Any]]:
    status, body = await api.search(PATIENTS, request)
    assert status == 200, body
    return [p["_name"]["firstName"] for p in body["data"]], body["metadata"]


async def test_search_sort_paging_and_free_text(api: Api, clock: ManualClock) -> None:
    await create_people(api, clock)

    names, _ = await found(api, {})  # default: newest first
    assert names == ["Walt", "Xena", "Yann", "Zoe"]

    asc = {"sort": [{"prop": "_name.firstName", "order": "ASC"}], "limit": 3, "page": 0}
    names, _ = await found(api, asc)
    assert names == ["Walt", "Xena", "Yann"]
    names, metadata = await found(api, asc | {"page": 1})
    assert names == ["Zoe"]
    assert metadata["page"] == {"totalResults": 4, "page": 1, "limit": 3}
    assert metadata["sort"] == asc["sort"]

    by_gender = {"sort": [{"prop": "_gender", "order": "ASC"}, {"prop": "score"}]}
    names, _ = await found(api, by_gender)
    assert names == ["Xena", "Zoe", "Yann", "Walt"]  # score DESC by default, missing last

    names, metadata = await found(api, {"freeTextSearch": "clark DIAZ"})
    assert set(names) == {"Xena", "Walt"}
    assert metadata["freeTextSearch"] == "clark DIAZ"


@pytest.mark.parametrize(
    "request_text",
    [
        "{not json",
        "[1]",
        '{"filter": {"_gender": {"equals": "X"}}}',
        '{"filter": {"_gender": "FEMALE"}}',
        '{"filter": {"_gender": {"in": "FEMALE"}}}',
        '{"filter": {"$OR": [1]}}',
        '{"limit": 0}',
        '{"page": -1}',
        '{"sort": [{"prop": "_id", "order": "UP"}]}',
        '{"sort": {"prop": "_id"}}',
    ],
)
async def test_bad_search_request_is_400(api: Api, request_text: str) -> None:
    status, error = await api.search(PATIENTS, request_text)
    assert status == 400
    assert error["code"] == "INVALID_SEARCH_REQUEST"
    assert set(error) == ERROR_KEYS


async def test_seeded_patients_exist_at_start(keys: list[rsa.RSAPrivateKey]) -> None:
    emulator = Emulator(EmulatorConfig(seed_patients=7), key_factory=cycling_factory(keys))
    patients = emulator.store.all(PATIENT)
    assert len(patients) == 7
    assert len({p["_email"] for p in patients}) == 7
