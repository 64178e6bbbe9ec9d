"""Museum: continual customization of text-to-image diffusion models."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Museum":
        from museum.museum import Museum

        return Museum
    raise AttributeError(name)


__all__ = ["Museum", "__version__"]
