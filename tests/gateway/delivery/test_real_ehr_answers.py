"""The delivery worker against answers real FHIR servers give (HAPI, Epic, Oracle Health,
Medplum, Aidbox, Azure/Google/AWS HealthLake) that the local EHR does not: absolute and
missing ``location``, ``status`` with or without a reason phrase, ``batch-response``
Bundles, entries that failed inside a 200, gzip bodies, proxy HTML error pages, empty
bodies. The EHR is an ``httpx.MockTransport`` handler."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.db.models import Delivery, RemoteId
from gateway.delivery.worker import DeliveryWorker
from gateway.runtime import Runtime
from gateway.worker import delivery_worker
from tests import samples
from tests.support.api import rows
from tests.support.gateway_env import profiles_with_target

BASE = "http://127.0.0.1:9/fhir"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    running = SimpleNamespace(fhir_base=BASE, token_url="http://127.0.0.1:9/token")
    return profiles_with_target(
        tmp_path / "profiles",
        running,  # type: ignore[arg-type]
        extra={"auth": {"method": "none"}},
    )


class Ehr:
    """Answers every transaction with ``answer(bundle)``; records what it got."""

    def __init__(self) -> None:
        self.answer: Callable[[dict[str, Any]], httpx.Response] = self.created
        self.bundles: list[dict[str, Any]] = []
        self.requests: list[httpx.Request] = []
        self.search: Callable[[httpx.Request], httpx.Response] | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "GET" and self.search is not None:
            return self.search(request)
        bundle = json.loads(request.content)
        self.bundles.append(bundle)
        return self.answer(bundle)

    @staticmethod
    def entries(
        bundle: dict[str, Any], location: Callable[[str, int], str | None], status: str
    ) -> list[dict[str, Any]]:
        out = []
        for i, entry in enumerate(bundle["entry"]):
            rtype = entry["resource"]["resourceType"]
            response: dict[str, Any] = {"status": status, "etag": 'W/"1"'}
            loc = location(rtype, i)
            if loc is not None:
                response["location"] = loc
            out.append({"response": response})
        return out

    def created(self, bundle: dict[str, Any]) -> httpx.Response:
        body = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": self.entries(bundle, lambda t, i: f"{t}/r{i}/_history/1", "201 Created"),
        }
        return httpx.Response(200, json=body)


def bundle_reply(
    entries: list[dict[str, Any]], kind: str = "transaction-response"
) -> httpx.Response:
    """A 200 answering a transaction with a Bundle of ``kind`` holding ``entries``."""
    return httpx.Response(200, json={"resourceType": "Bundle", "type": kind, "entry": entries})


def found_by_type(request: httpx.Request) -> httpx.Response:
    """A search that finds one resource, ``found-<Type>``, of the type searched."""
    rtype = request.url.path.rsplit("/", 1)[-1]
    found = [{"resource": {"resourceType": rtype, "id": f"found-{rtype}"}}]
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": found})


@pytest.fixture
def ehr() -> Ehr:
    return Ehr()


@pytest.fixture
async def worker(runtime: Runtime, ehr: Ehr) -> AsyncIterator[DeliveryWorker]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(ehr.handler))
    w = delivery_worker(runtime, concurrency=1, http=http)
    try:
        yield w
    finally:
        await w.aclose()
        await http.aclose()


Deliver = Callable[[], Awaitable[Delivery]]


@pytest.fixture
def deliver(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    runtime: Runtime,
    worker: DeliveryWorker,
) -> Deliver:
    """``await deliver()``: submit one intake, run one worker round, return its delivery."""

    async def one() -> Delivery:
        r = await client.post(
            "/v1/intake-submissions", json=samples.intake(), headers=admin_headers
        )
        assert r.status_code == 202, r.text
        [d] = r.json()["deliveries"]
        assert await worker.run_once() == 1
        (row,) = await rows(runtime, Delivery, Delivery.id == d["id"])
        return row

    return one


async def remote_ids(runtime: Runtime) -> dict[str, tuple[str, str | None]]:
    return {
        f"{r.resource_type}": (r.remote_id, r.remote_version) for r in await rows(runtime, RemoteId)
    }


async def test_absolute_locations_and_status_codes_without_reason(
    deliver: Deliver,
    runtime: Runtime,
    ehr: Ehr,
) -> None:
    ehr.answer = lambda b: httpx.Response(
        200,
        json={
            "resourceType": "Bundle",
            "type": "transaction-response",
            "meta": {"lastUpdated": "2026-12-06T10:00:00Z"},
            "link": [{"relation": "self", "url": BASE}],
            "entry": Ehr.entries(
                b, lambda t, i: f"https://ehr.example.org/fhir/{t}/abs{i}/_history/3", "201"
            ),
        },
        headers={"Content-Type": "application/fhir+json;charset=UTF-8"},
    )
    row = await deliver()
    assert row.status == "delivered"
    ids = await remote_ids(runtime)
    assert ids["Patient"] == ("abs0", "3")


async def test_gzip_encoded_transaction_response(
    deliver: Deliver,
    runtime: Runtime,
    ehr: Ehr,
) -> None:
    def answer(bundle: dict[str, Any]) -> httpx.Response:
        body = json.dumps(ehr.created(bundle).json()).encode()
        return httpx.Response(
            200,
            content=gzip.compress(body),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    ehr.answer = answer
    row = await deliver()
    assert row.status == "delivered"
    assert (await remote_ids(runtime))["Patient"] == ("r0", "1")


async def test_entries_that_failed_inside_a_200_are_not_delivered(
    deliver: Deliver,
    ehr: Ehr,
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "required", "diagnostics": "birthDate"}],
    }

    def answer(bundle: dict[str, Any]) -> httpx.Response:
        entries = Ehr.entries(bundle, lambda t, i: f"{t}/r{i}" if i else None, "201 Created")
        entries[0]["response"] = {"status": "422 Unprocessable Entity", "outcome": outcome}
        return bundle_reply(entries, "batch-response")

    ehr.answer = answer
    row = await deliver()
    assert (row.status, row.dead_reason, row.last_status_code) == ("dead", "rejected", 422)
    assert row.operation_outcome is not None
    assert row.operation_outcome["issue"][0]["code"] == "required"


async def test_a_failed_entry_in_a_transaction_response_is_not_delivered(
    deliver: Deliver,
    runtime: Runtime,
    ehr: Ehr,
) -> None:
    def answer(bundle: dict[str, Any]) -> httpx.Response:
        entries = Ehr.entries(bundle, lambda t, i: f"{t}/r{i}", "201 Created")
        entries[-1]["response"] = {"status": "400"}  # no outcome at all
        return bundle_reply(entries)

    ehr.answer = answer
    row = await deliver()
    assert (row.status, row.dead_reason, row.last_status_code) == ("dead", "rejected", 400)
    # a transaction is all or nothing: the ids of the other entries are not trusted (a
    # replay finds what was written by ifNoneExist)
    assert await remote_ids(runtime) == {}


async def test_a_5xx_entry_is_retried(
    deliver: Deliver,
    ehr: Ehr,
) -> None:
    def answer(bundle: dict[str, Any]) -> httpx.Response:
        entries = Ehr.entries(bundle, lambda t, i: f"{t}/r{i}", "201 Created")
        entries[1]["response"] = {"status": "503 Service Unavailable"}
        return bundle_reply(entries, "batch-response")

    ehr.answer = answer
    row = await deliver()
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 503)


async def test_a_412_entry_goes_to_review_not_a_retry_loop(
    deliver: Deliver,
    worker: DeliveryWorker,
    ehr: Ehr,
) -> None:
    def answer(bundle: dict[str, Any]) -> httpx.Response:
        entries = Ehr.entries(bundle, lambda t, i: f"{t}/r{i}", "201 Created")
        entries[0]["response"] = {"status": "412 Precondition Failed"}
        return bundle_reply(entries, "batch-response")

    def search(request: httpx.Request) -> httpx.Response:
        found = [{"resource": {"resourceType": "Patient", "id": i}} for i in ("p1", "p2")]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": found}
        )

    ehr.answer, ehr.search = answer, search
    row = await deliver()
    assert (row.status, row.last_status_code) == ("review", 412)
    assert await worker.run_once() == 0
    assert len(ehr.bundles) == 1


async def test_a_missing_location_is_looked_up_by_identifier(
    deliver: Deliver,
    runtime: Runtime,
    ehr: Ehr,
) -> None:
    """Some servers leave out ``location`` when ``ifNoneExist`` matched (``200 OK``)."""

    def answer(bundle: dict[str, Any]) -> httpx.Response:
        entries = Ehr.entries(bundle, lambda t, i: None, "200 OK")
        return bundle_reply(entries)

    ehr.answer, ehr.search = answer, found_by_type
    row = await deliver()
    assert row.status == "delivered"
    assert (await remote_ids(runtime))["Patient"] == ("found-Patient", "1")
    searched = [r for r in ehr.requests if r.method == "GET"]
    assert searched and all("identifier=" in str(r.url) or "_tag=" in str(r.url) for r in searched)


async def test_a_proxy_html_error_page_is_retried(
    deliver: Deliver,
    ehr: Ehr,
) -> None:
    ehr.answer = lambda b: httpx.Response(
        502,
        content=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        headers={"Content-Type": "text/html"},
    )
    row = await deliver()
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 502)


@pytest.mark.parametrize(
    ("status", "up"), [(200, True), (401, True), (403, True), (503, False), (502, False)]
)
async def test_the_circuit_probe_counts_an_authenticated_metadata_endpoint_as_up(
    runtime: Runtime, worker: DeliveryWorker, status: int, up: bool
) -> None:
    """The probe sends no token; Google Cloud Healthcare answers ``/metadata`` 401 without."""

    def metadata(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/fhir/metadata" and "authorization" not in request.headers
        body = {"resourceType": "CapabilityStatement"} if status == 200 else {}
        return httpx.Response(status, json=body)

    http = httpx.AsyncClient(transport=httpx.MockTransport(metadata))
    sender = delivery_worker(runtime, http=http).senders["ehr"]
    try:
        assert await sender.probe("test-ehr") is up
    finally:
        await sender.aclose()
        await http.aclose()


async def test_a_redirect_is_a_configuration_error_not_a_dead_letter(
    deliver: Deliver,
    ehr: Ehr,
) -> None:
    """``http://`` configured for an ``https://`` server (or a moved base): 301/308."""
    ehr.answer = lambda b: httpx.Response(
        308, headers={"Location": "https://ehr.example.org/fhir"}, content=b""
    )
    row = await deliver()
    assert (row.status, row.attempts) == ("pending", 0)
    assert row.last_error is not None and "base_url" in row.last_error


@pytest.mark.parametrize("status", [200, 204])
async def test_an_empty_2xx_answer_is_delivered_and_the_ids_looked_up(
    deliver: Deliver,
    runtime: Runtime,
    ehr: Ehr,
    status: int,
) -> None:
    """A transaction that succeeded with no Bundle in the answer (non-conformant)."""

    ehr.answer = lambda b: httpx.Response(status, content=b"")
    ehr.search = found_by_type
    row = await deliver()
    assert (row.status, row.attempts) == ("delivered", 1)
    assert (await remote_ids(runtime))["Patient"] == ("found-Patient", None)
    assert len(ehr.bundles) == 1


async def test_a_malformed_operation_outcome_still_dead_letters(
    deliver: Deliver,
    ehr: Ehr,
) -> None:
    """``issue`` as an object instead of a list (seen from hand-written servers)."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": {"severity": "error", "code": "invalid"},
    }
    ehr.answer = lambda b: httpx.Response(400, json=outcome)
    row = await deliver()
    assert (row.status, row.dead_reason, row.last_status_code) == ("dead", "rejected", 400)
