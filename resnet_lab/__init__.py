"""resnet-lab: train a CIFAR ResNet18 and measure what compression does to its accuracy, size and speed."""
__version__ = "0.1.0"
