"""The data path: the gRPC servicer, the router-level and per-attempt exchanges and their stages."""
