"""The dead-letter queue: its envelopes, reading and replaying them, and the salvage of rejected tasks."""
