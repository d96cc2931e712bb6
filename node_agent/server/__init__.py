"""The inference server behind ``edgefleet-serve`` (entry point: :mod:`node_agent.serve`).

- ``settings``: flags and ``EDGEFLEET_SERVE_*`` variables
- ``model``: one loaded, warmed-up version; loading from the cache or a file
- ``tensors``: JSON / npz decoding, validation against the signature, encoding
- ``npz``: the zero-copy fast path for what ``np.savez`` writes (``np.load`` otherwise)
- ``metrics``: the Prometheus metrics, in a per-server registry
- ``app``: the HTTP server and the model slot (hot swap, drain)
"""
