"""Batch decoders that decode a whole batch in the training process, on the GPU when there is
one: NVIDIA DALI (`dali`) and nvJPEG through torchvision (`nvjpeg`)."""
