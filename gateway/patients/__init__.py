"""The patients domain, shared by every channel: one match
(:mod:`~gateway.patients.matching`), one merge by ownership
(:mod:`~gateway.patients.merge`), and the repository of keys, element sources and
conflicts (:mod:`~gateway.patients.repository`)."""
