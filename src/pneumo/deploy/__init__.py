"""The deploy layer: predict, serve, DICOM SR/GSPS, ONNX, model versions and their cards. Imports
models, data and shared (never training)."""
