"""Generated gRPC stubs of textgen.v1 (see service/protogen.py); do not edit by hand."""
