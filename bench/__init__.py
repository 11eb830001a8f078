"""Benchmarks (not part of the test run): ``python -m bench.<name>``."""

import os

# Benchmarks talk only to EHRs, token endpoints and subscribers served on 127.0.0.1 over
# plain HTTP; the egress control (gateway/egress.py) refuses that unless told to. The
# gateway processes a benchmark starts inherit this environment.
os.environ.setdefault("GATEWAY_EGRESS_ALLOW_LOOPBACK", "true")
