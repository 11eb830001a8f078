"""HL7 v2 domain: POST /v1/hl7v2 and the MLLP listener."""
