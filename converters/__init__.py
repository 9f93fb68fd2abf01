"""Framework models into explainable ONNX. Framework imports live here and only here."""
