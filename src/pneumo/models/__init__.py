"""The models layer: networks built from parts (encoders, the decoder, heads), the LightningModule,
post-processing and the choice of its settings. Imports the data layer and the shared modules."""
