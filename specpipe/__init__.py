"""specpipe: distributed, pipelined speculative decoding served over gRPC.

`from specpipe import Client` is the Python client (specpipe/client.py).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing specpipe (as the workers do) must not pull in grpc.
    if name == "Client":
        from specpipe.client import Client

        return Client
    raise AttributeError(name)
