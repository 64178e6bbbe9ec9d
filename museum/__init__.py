"""Museum: continual customization of text-to-image diffusion models."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Museum":  # imported on first use: ``import museum`` (and the CLI's --help) stays light, no torch
        from museum.museum import Museum

        return Museum
    raise AttributeError(name)


__all__ = ["Museum", "__version__"]
