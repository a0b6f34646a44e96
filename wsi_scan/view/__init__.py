"""``wsi-scan view``: a local, read-only web viewer of slides with their heatmaps and lesions.

``server`` (routes, the HTTP server), ``tiles`` (Deep Zoom tiles of the slide and the heatmap in
the slide's level-0 frame) and ``static/`` (the page, and OpenSeadragon, shipped with its
licence). Nothing is imported here: ``import wsi_scan`` stays light.
"""
