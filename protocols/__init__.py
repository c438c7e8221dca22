"""Wire protocols spoken by Callboard: pure codecs and state machines, thin Twisted adapters.

Nothing here imports the daemon: each protocol declares the small interface it needs
(a file source, an activation authority, a registration policy) and the daemon plugs the
registry in behind it.
"""
