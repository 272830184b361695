"""The built-in model: the offline SD-shaped pipeline (`tiny`), the Fashion-MNIST scenes it is
trained on (`scenes`) and its pretraining (`pretrain`). None of it is the method; the service
and the tests use it because no pretrained weights can be downloaded."""
