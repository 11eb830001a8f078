"""The durable inbox (every acknowledged message, stored raw) and the exceptions queue."""
