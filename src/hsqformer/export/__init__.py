"""Export of a finished cross-validation run to deployable formats (``hsqformer export``).

``onnx``: the fold models, or their ensemble as one graph, as ONNX files with a description
(``export.json`` and ``README.md``) of the inputs, the preprocessing and the outputs, and an
optional check that onnxruntime reproduces the PyTorch probabilities on given images.
"""
