"""The device registry: records and rules, durable storage, and the live in-memory view."""
