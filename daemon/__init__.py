"""The Callboard daemon: configuration, device registry, admin API and the service tree."""
