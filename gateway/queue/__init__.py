"""The one queue: claim, lease and heartbeat, per-key order, retry schedules, worker loops."""
