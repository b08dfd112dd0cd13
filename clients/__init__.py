"""protoserve.clients: Python clients and the command line."""
