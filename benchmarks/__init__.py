"""The performance harness: engine-only, end-to-end gRPC and interference benchmarks (``textgen bench``)."""
