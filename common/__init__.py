"""protoserve.common: what the server, the gateway and the clients share.

Facts of the API that are not the server's to own: the log format and the
request-id rule both processes follow (:mod:`.logs`), the tensor element types
and their names in each protocol (:mod:`.dtypes`), and the Open Inference
Protocol's BYTES framing (:mod:`.framing`), and TLS files read and checked
once (:mod:`.tls`). Nothing here imports the server,
the gateway, the clients or torch (docs/architecture.md, rule 3), so each of
them can import it.
"""
