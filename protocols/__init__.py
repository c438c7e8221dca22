"""Wire protocols spoken by Callboard, each a pure codec and state machine plus a thin Twisted adapter.

Nothing here imports the daemon: each protocol declares the small interface it needs
(a file source, an activation authority, a registration policy) and the daemon plugs the
registry in behind it.
"""
