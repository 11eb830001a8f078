"""API clients: keys (hashed at rest), scopes, and the request authentication dependency."""
