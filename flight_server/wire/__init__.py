"""The wire protocol: JSON tickets, descriptors and action bodies, and the errors a request can meet.

The lowest layer, and the only part of the server that `flight_client` imports: stdlib and pyarrow only.
"""
