"""The control plane: the supervisor that runs Envoy and the gRPC server, and the Envoy config renderer."""
