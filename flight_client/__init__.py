"""Client for the feature Flight server: `FeatureClient` and the pandas helper `read_flight`."""

from flight_client.client import FeatureClient, WriteResult, read_flight
from flight_client.errors import (
    ConflictError,
    FeatureServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from flight_client.results import FeatureResult

__all__ = [
    "ConflictError",
    "FeatureClient",
    "FeatureResult",
    "FeatureServerError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "WriteResult",
    "read_flight",
]
