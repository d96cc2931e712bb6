"""The node side on ``tflite_runtime`` 2.14, the fallback TFLite interpreter for numpy<2
nodes (the ``tflite-legacy`` extra).

These tests run only in their own environment: numpy<2 and tflite-runtime, without
ai-edge-litert (which would be chosen first) or the controller's dependencies.
``scripts/test`` builds it and runs this directory with its own conftest only; the main
suite skips the directory (``collect_ignore`` in ``tests/node_agent/conftest.py``).
Nothing here skips: on any other interpreter the tests fail."""

# The label node_agent.runtimes gives the interpreter: what every test expects to see.
TFLITE_RUNTIME = "tflite_runtime 2.14.0"
