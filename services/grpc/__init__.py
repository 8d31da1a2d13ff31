"""The gRPC transport: the adpa.v1.Scorer servicer, its interceptors and server, and the gRPC reference."""
