"""The edge: remote activation over the internet (OAuth 2.0 with the MIC), provisioning
through the edge with bearer tokens, and SIP over TLS with bearer tokens.

``docs/REMOTE.md`` is the open specification of what a phone sends and receives here.
"""
