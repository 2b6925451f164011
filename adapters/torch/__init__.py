"""PyTorch adapter of ssmcore (``ssmcore.adapters.torch``).

Custom ops with autograd, the Mamba/Mamba2 modules and the language model live
here. Until they land, torch tensors can be passed to any ``ssmcore`` op
directly: they are imported zero-copy through DLPack and results come back as
NumPy/CuPy arrays (``torch.from_dlpack`` takes them back without a copy).
"""
