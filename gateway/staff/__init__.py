"""Staff accounts of the ops console: people, not API clients (:mod:`.service`)."""
