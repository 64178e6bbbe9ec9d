"""The procedural world everything above is trained and measured on: ``render`` (scenes, their renders and
captions, the base and held-out vocabularies) and ``concepts`` (the held-out customization concepts and the
benchmark's task sequence); ``v2`` is the 64x64 world being built beside it (docs/world-v2/README.md).
Import from the modules: ``from museum.world.render import render, caption``."""
