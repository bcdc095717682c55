"""The cloud side: the gRPC server running model tails."""
