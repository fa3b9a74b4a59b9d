"""`flight-bench`: reproducible throughput benchmarks of the feature server, each next to its ceiling or baseline."""
