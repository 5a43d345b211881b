"""kiln: Stable Diffusion inference in plain, fast, verifiable PyTorch."""
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a checkpoint into a ready `kiln.pipeline.Pipeline` (see `kiln.pipeline.load`)."""
    from .pipeline import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
