"""RTP for the voice prompts: packets (RFC 3550), G.711, paced sending, RFC 4733 digits."""
