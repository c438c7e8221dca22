"""The HTTPS front door: Self-Care, the admin console and the REST API on one listener."""
