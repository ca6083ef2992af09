"""Generated gRPC stubs of serve/p5ray.proto (`python serve/gen_proto.py`); do not edit."""
