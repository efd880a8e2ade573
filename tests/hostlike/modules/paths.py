import tempfile

models_path = tempfile.gettempdir()
