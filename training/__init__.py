"""convserve training: datasets, the CNN, the train / evaluate loop, and verified ONNX export."""
