"""TLS for the Flight server: a certificate and key (`grpc+tls`), and client certificates (mutual TLS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from flight_server.base.config import ServerConfig


def server_tls_options(config: ServerConfig) -> dict[str, Any]:
    """`FlightServerBase` keyword arguments for the configured TLS; none without a certificate."""
    if config.tls_cert is None or config.tls_key is None:
        if config.tls_cert or config.tls_key or config.tls_client_ca:
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        return {}
    options: dict[str, Any] = {
        "tls_certificates": [flight.CertKeyPair(Path(config.tls_cert).read_bytes(), Path(config.tls_key).read_bytes())]
    }
    if config.tls_client_ca is not None:
        options.update(verify_client=True, root_certificates=Path(config.tls_client_ca).read_bytes())
    return options
