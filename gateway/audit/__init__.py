"""The audit trail: every read and write of PHI as an IHE BALP AuditEvent, in a hash chain.

* :mod:`~gateway.audit.service`: recording an entry (in the caller's unit of work);
* :mod:`~gateway.audit.chain`: the hash chain (seal, verify, retention);
* :mod:`~gateway.audit.fhir`: entries as FHIR R4 AuditEvents, and their search.
"""
