"""mimflow: masked-image-model pretraining and label-scarce fine-tuning of ViTs, tracked in MLflow."""
__version__ = "0.1.0"
