"""Using a model: image-to-image, DreamBooth / LoRA, ONNX export and runtime, the local demo page."""
