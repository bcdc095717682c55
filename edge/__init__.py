"""The edge side: EdgeClient and the splitnet-edge command."""
