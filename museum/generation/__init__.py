"""Generation: seeded sampling, truncated-prompt warnings and image grids."""

from museum.generation.sampling import generate_images, image_grid, warn_if_truncated

__all__ = ["generate_images", "image_grid", "warn_if_truncated"]
