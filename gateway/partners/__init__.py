"""partners domain: JSON webhooks from provider networks and pharmacies."""
