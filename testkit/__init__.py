"""Local stand-ins for the gateway's external peers, shared by ``tests/`` and ``bench/``.

* :mod:`testkit.fhir_server`: a real FHIR R4 server (Medplum's ``@medplum/fhir-router`` and
  ``MemoryRepository`` under Node), run as a child process; one process serves many isolated
  tenants.
* :mod:`testkit.ehr`: a local EHR for tests and benchmarks: an OAuth token endpoint (SMART
  Backend Services), bearer-token checks, scripted faults and request records, in front of
  a tenant of that FHIR server. ``python -m testkit.ehr`` runs one standalone.
* :mod:`testkit.samples`: synthetic payloads (intake, checkout, Stripe event).

Why a top-level package of its own: benchmarks need the same local EHR and samples as the
tests, and ``bench/`` must not import ``tests/`` (an import-linter contract checks both
directions of that rule). It is not part of the wheel (``pyproject.toml`` packages only
``gateway`` and ``mappers``), and it never imports ``gateway``: it plays the systems the
gateway talks to.
"""
