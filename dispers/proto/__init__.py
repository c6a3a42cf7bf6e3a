"""Generated protobuf and gRPC code (dev/gen_protos.py); never edit by hand."""
