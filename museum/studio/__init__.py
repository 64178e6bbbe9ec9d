"""The local web studio, ``museum serve [DIR]``: learn, browse, draw with and export a museum's concepts, and open a
benchmark report, in a browser (Gradio; ``pip install -e ".[studio]"``). docs/STUDIO.md shows its tabs.

``core.py`` does the work without the page (the learning job, uploads, generation, export, the report) and imports
no Gradio; ``app.py`` builds the page on it and serves it."""
