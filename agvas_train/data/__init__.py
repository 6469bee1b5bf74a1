"""Data: readers (``meta.py`` for meta.json and the MVTec layout, ``folder.py`` for plain image
folders), the synthetic anomaly generator (``synthetic.py``), the Anomaly-Instruct field and
conversation generator (``instruct.py``), training sources (``sources.py``) and the mixture
sampler + batch collation (``mixture.py``)."""
