"""Flight transport: the service that routes RPCs, authentication, limits, the idle watch and TLS."""
