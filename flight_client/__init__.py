"""Client for the feature Flight server: `FeatureClient` and the pandas helper `read_flight`."""

from flight_client.client import FeatureClient, WriteResult, read_flight
from flight_client.errors import (
    ConflictError,
    FeatureServerError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
)

__all__ = [
    "ConflictError",
    "FeatureClient",
    "FeatureServerError",
    "InvalidRequestError",
    "NotFoundError",
    "ResourceExhaustedError",
    "WriteResult",
    "read_flight",
]
