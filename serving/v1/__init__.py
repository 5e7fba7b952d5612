"""Generated gRPC stubs of protos/tablezip/v1 (python -m tablezip.serving.gen_protos)."""
