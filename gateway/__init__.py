"""fhir-gateway: the service (API, persistence, delivery worker, events, workflow, CLI).

``gateway`` depends on ``mappers`` (pure mapping) and never the reverse.
"""

__version__ = "0.1.0"
