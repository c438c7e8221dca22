"""An emulated Cisco IP phone that boots, activates and registers like real hardware."""
