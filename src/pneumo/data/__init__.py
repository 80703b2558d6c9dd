"""The data layer: DICOM reading, the RSNA layout, prepare's cache, batches and augmentation, synthetic
data, validation and exploration. Imports only the shared modules beside it."""
