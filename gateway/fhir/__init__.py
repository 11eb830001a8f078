"""fhir domain."""
