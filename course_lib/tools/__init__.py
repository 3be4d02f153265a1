"""The course's machinery that every lesson leans on (the bottom layer: it imports no other layer).

profiles   the ci / cpu / gpu sizes, the device, seeding (00_setup)
assets     the pinned pretrained models and corpora: fetched from the package index, checked, cached (00_setup)
index      the package index read the way pip reads it: settings, credentials, the simple API, downloads
cachedir   the cache folder: manifests checked against pins in the code, locks across processes
data       datasets built from those assets: Shakespeare (04), the VADER sentiment corpora (06-09)
results    recorded runs with their provenance under data/results/ (03-09)
plots      figures several lessons draw (first in 01_attention)
widgets    ipywidgets explorers, and running a notebook headless with its progress bars finished
"""
