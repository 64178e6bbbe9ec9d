"""Generation: seeded sampling and image grids."""

from museum.generation.sampling import generate_images, image_grid

__all__ = ["generate_images", "image_grid"]
