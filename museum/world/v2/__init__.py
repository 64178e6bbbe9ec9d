"""World v2: 64x64 scenes with a broad captioned vocabulary (:mod:`.render`) and concepts that are unnamed
instances of it (:mod:`.concepts`). Beside the current world until the model trained on it ships."""
