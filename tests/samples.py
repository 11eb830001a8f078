"""Synthetic sample payloads for tests: :mod:`testkit.samples`, shared with the benchmarks."""

from testkit.samples import EXAMPLES, canonical_checkout, intake, stripe_event

__all__ = ["EXAMPLES", "canonical_checkout", "intake", "stripe_event"]
