"""The World v2 embedded model (64x64): its components and its resumable pretraining. Beside the shipped
model until it passes its acceptance checks (docs/world-v2/README.md), then it replaces it."""
