"""The pure routing core: compiled routing table, strategies and decisions (no I/O, no gRPC)."""
