//! Import torchvision ResNet checkpoints into `resnet-model` records.
