"""Client for the feature Flight server: `FeatureClient` and the pandas helper `read_flight`."""

from flight_client.client import FeatureClient, WriteResult, read_flight
from flight_client.errors import ConflictError, FeatureServerError, InvalidRequestError, NotFoundError

__all__ = [
    "ConflictError",
    "FeatureClient",
    "FeatureServerError",
    "InvalidRequestError",
    "NotFoundError",
    "WriteResult",
    "read_flight",
]
