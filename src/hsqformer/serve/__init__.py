"""``hsqformer serve``: a local web app that screens uploaded ultrasound images with a finished cv run.

- :mod:`hsqformer.serve.card`: the model card and the operating point, computed from the run folder;
- :mod:`hsqformer.serve.uploads`: uploaded PNG/JPEG/DICOM files decoded in memory, in a temporary
  folder that is removed when the request ends;
- :mod:`hsqformer.serve.screening`: probabilities, decisions and heatmaps, without any web code;
- :mod:`hsqformer.serve.app`: the gradio page (one image, or a batch with a CSV) and the server.
"""
