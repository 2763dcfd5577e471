"""Generated protobuf modules (make protos); do not edit."""
