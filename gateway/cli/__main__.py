"""``python -m gateway.cli``: the ``fhir-gateway`` command."""

from gateway.cli import main

main()
