"""Pure mapping functions: normalization, profiles, payload -> FHIR R4, events.

Nothing in this package does I/O, touches a database or a web framework, or logs: it maps
validated input to FHIR resources (``fhir.resources.R4B`` models, wire-compatible with R4
4.0.1 for the resource types we emit) and raises :class:`mappers.errors.MappingErrors`
naming every problem it found. ``gateway`` imports ``mappers``; never the reverse.
"""
