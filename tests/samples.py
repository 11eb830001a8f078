"""Synthetic sample payloads for tests: :mod:`testkit.samples`, shared with the benchmarks."""

from testkit.samples import EXAMPLES, canonical_checkout, intake, person, stripe_event, varied

__all__ = ["EXAMPLES", "canonical_checkout", "intake", "person", "stripe_event", "varied"]
