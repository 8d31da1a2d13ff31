"""Teacher and reference scoring services: engine, validation, gRPC and HTTP servers."""
