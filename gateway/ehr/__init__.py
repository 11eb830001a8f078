"""EHR connectors: the FHIR REST client and its error translation."""
