"""subscribers domain: ops-layer endpoints that receive signed case webhooks."""
